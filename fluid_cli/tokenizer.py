"""A character-level tokenizer built at run time, for models grown from scratch (the demo, the tests).

No pretrained tokenizer can be shipped, so the project builds one over the alphabet of its training text with
the `tokenizers` library: one token per character, plus the special tokens a chat model and FLUID need, and a
small chat template. It is a normal `PreTrainedTokenizerFast` and is saved next to the model.

    >>> tok = build_char_tokenizer("abc ")
    >>> tok.decode(tok("cab a")["input_ids"])
    'cab a'
    >>> tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    '<|user|>ab<|end|><|assistant|>'
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models
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
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[*ROLE_TOKENS, MASK],
        chat_template=CHAT_TEMPLATE,
    )
