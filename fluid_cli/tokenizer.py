"""Tokenizers built at run time, for models grown from scratch (the demo, the tests).

No pretrained tokenizer can be shipped, so the project builds one with the `tokenizers` library: either one token
per character (`build_char_tokenizer`), or a small byte-level BPE trained on the training text with every digit
its own token (`build_bpe_tokenizer`: words become single tokens, so sequences are about 3x shorter while
arithmetic still sees digits). Both carry the special tokens a chat model and FLUID need and a small chat
template. They are normal `PreTrainedTokenizerFast`s and are saved next to the data and the model.

    >>> tok = build_char_tokenizer("abc ")
    >>> tok.decode(tok("cab a")["input_ids"])
    'cab a'
    >>> tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    '<|user|>ab<|end|><|assistant|>'
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
MASK = "<|mask|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, *ROLE_TOKENS, MASK]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Printable ASCII: enough for English text, code and arithmetic, so held-out text never hits <unk>.
DEFAULT_ALPHABET = string.printable


def _wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[*ROLE_TOKENS, MASK],
        chat_template=CHAT_TEMPLATE,
    )


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens trained on `texts`; digits are never merged.

    Any text round-trips, also text unseen in training (it falls back to bytes).

    >>> tok = build_bpe_tokenizer(["Ava has 12 apples.", "Ben has 3 apples."] * 20, vocab_size=300)
    >>> tok.decode(tok("Zoe has 45 apples!")["input_ids"])
    'Zoe has 45 apples!'
    >>> tok.convert_ids_to_tokens(tok(" 45")["input_ids"])
    ['Ġ', '4', '5']
    """
    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return _wrap(core)


def build_char_tokenizer(alphabet: Iterable[str] = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `alphabet` (special tokens first, ids 0..7; then sorted characters)."""
    chars = sorted(set(alphabet) - set(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    # BPE without merges splits a string into its characters; Fuse joins them back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(core)
