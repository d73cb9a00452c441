"""Hugging Face loading: causal LMs, tokenizers, models grown from scratch, the mask token, the device rule.

Plain arguments only (paths, names, numbers): the commands translate their recipe tables into these calls. Every
failure a user can cause (a wrong path, a folder without weights, a broken tokenizer) is one `FluidError` line
that names the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fluid_cli.config import device_error
from fluid_cli.errors import FluidError, first_line

# --------------------------------------------------------------------------------------------- device and dtype


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the GPU when there is one, else the CPU; anything else as given (`cuda:1`, `cpu`), if
    this machine has it. The one check of a device every command's loading goes through.

    >>> resolve_device("gpu")
    Traceback (most recent call last):
    fluid_cli.errors.FluidError: device: 'gpu' is not a device: expected auto, cpu, cuda, cuda:N (the N-th GPU), mps or xpu
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(name, str) and (problem := device_error(name)):
        raise FluidError(f"device: {problem}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FluidError(f"device {name}: no CUDA device is available here (choose cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FluidError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if (device.type == "mps" and not torch.backends.mps.is_available()) or \
            (device.type == "xpu" and not torch.xpu.is_available()):
        raise FluidError(f"device {name}: no {device.type} device is available here (choose cpu or auto)")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """`auto` (or None): bfloat16 on a GPU that has it, float32 elsewhere (and with no device); else the named
    dtype.

    >>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("float16", torch.device("cpu"))
    (torch.float32, torch.float16)
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        bf16 = device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FluidError(f"dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return dtype


# --------------------------------------------------------------------------------------------- loading


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def check_model_folder(path: str) -> None:
    """A local model folder needs config.json and weights: say so before any work that would come to nothing."""
    if not (path.startswith((".", "/", "~")) or os.path.exists(path)):
        return  # a hub id: only loading can tell
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FluidError(f"{path}: model folder not found" if not folder.exists() else
                         f"{path}: not a folder (a model is a folder with config.json and weights)")
    if not (folder / "config.json").is_file():
        raise FluidError(f"{path}: no config.json (not a transformers model folder)")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise FluidError(f"{path}: no weights (model.safetensors or pytorch_model.bin); the folder holds only the "
                         "configuration")


def model_identity(path: str) -> str:
    """What names a model's weights, not its path: a digest of every file's bytes in a local model folder (weights,
    config, tokenizer), so a model replaced at the same path is another model; a hub id is its name (the hub's
    cache keeps one snapshot per revision). Reads the whole folder once: about 2 s per GB on this project's 2-core
    machine, next to the hours a regeneration with a model of that size takes."""
    import hashlib

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return path
    h = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:16]


PLAIN_REMEDY = "re-download or re-save the model"


def check_weight_files(folder: Path, remedy: str = PLAIN_REMEDY) -> None:
    """Every `*.safetensors` file in `folder` must be whole (its header read and its data covered) and its
    `config.json` / `adapter_config.json` JSON: a damaged file is named before a library fails on it somewhere
    inside."""
    import json

    from safetensors import safe_open

    for config in (folder / "config.json", folder / "adapter_config.json"):
        try:
            json.loads(config.read_bytes()) if config.is_file() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FluidError(f"{config}: unreadable JSON ({first_line(e)}); {remedy}") from None
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise FluidError(f"{file}: corrupt or truncated weight file ({first_line(e)}); {remedy}") from None


def load_causal_lm(path: str, *, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
                   attn_implementation: str | None = None, remedy: str = PLAIN_REMEDY) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path)` with one-line errors (local folder or hub id); `remedy` says
    how to get a damaged local model whole again."""
    check_model_folder(path)
    if Path(path).expanduser().is_dir():
        check_weight_files(Path(path).expanduser(), remedy)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as e:  # a truncated or corrupt weight file
        raise FluidError(f"{path}: corrupt weight file ({first_line(e)}); {remedy}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise FluidError(f"{path}: cannot load a causal LM ({first_line(e)})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(name: str, *, trust_remote_code: bool = False, remedy: str | None = None) -> Any:
    """The tokenizer in a model folder (or of a hub id), with a one-line error when it cannot be read; `remedy`
    says how to get a damaged local folder whole again."""
    folder = Path(name).expanduser()
    fix = f"; {remedy}" if remedy else ""
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FluidError(f"{name}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}){fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types for an unreadable folder
        raise FluidError(f"{name}: cannot load a tokenizer ({first_line(e)}){fix}") from None
    # Every command measures lengths against the model's context itself (prompts, training rows, lm-eval's
    # requests), so transformers' "Token indices sequence length is longer than..." is noise: mark it as said.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def build_scratch_model(
    tokenizer: Any,
    *,
    architecture: str = "llama",
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    max_position_embeddings: int = 512,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture (a transformers model_type), sized for
    `tokenizer`, with tied input and output embeddings."""
    try:
        config = AutoConfig.for_model(
            architecture,
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=hidden_size // num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    except ValueError as e:
        raise FluidError(f"[model.scratch] architecture: {e}") from None
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------------------------- model facts


def text_config(config: Any) -> Any:
    """The language model's config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size_of(config: Any) -> int:
    return int(text_config(config).hidden_size)


def context_length(config: Any) -> int | None:
    """The model's positions (`max_position_embeddings`), if its config names them."""
    value = getattr(text_config(config), "max_position_embeddings", None)
    return int(value) if value else None


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding (peft may wrap the layer, so read the weight's shape)."""
    emb = model.get_input_embeddings()
    weight = emb.base_layer.weight if hasattr(emb, "base_layer") else emb.weight
    return int(weight.shape[0])


def eos_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """The tokenizer's EOS plus the generation config's (chat models often end turns with another token)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


# --------------------------------------------------------------------------------------------- the mask token


def vocab_differences(a: Any, b: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """The tokens (sorted) that two tokenizers map to different ids, or that only one of them has.

    >>> class Tok:
    ...     def __init__(self, vocab): self.vocab = vocab
    ...     def get_vocab(self): return self.vocab
    >>> vocab_differences(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 2, "c": 3}), ignore=("c",))
    ['b']
    """
    va, vb = a.get_vocab(), b.get_vocab()
    return sorted(t for t in va.keys() | vb.keys() if t not in ignore and va.get(t) != vb.get(t))


def resolve_mask_token(tokenizer: Any, model: PreTrainedModel, mask_token: str, add: bool = True) -> tuple[int, bool]:
    """Find `mask_token` in the vocabulary, or add it as a special token and grow the embeddings.

    Returns `(mask_token_id, added)`.
    """
    if not mask_token:
        raise FluidError("[fluid] mask_token: empty; name a reserved token of the vocabulary or a new one to add")
    vocab = tokenizer.get_vocab()
    if mask_token in vocab:
        token_id, added = vocab[mask_token], False
    elif not add:
        raise FluidError(
            f"[fluid] mask_token: {mask_token!r} is not in the tokenizer's vocabulary and "
            "add_mask_token = false (name an existing reserved token, or allow adding it)"
        )
    else:
        tokenizer.add_tokens([AddedToken(mask_token, special=True, normalized=False)], special_tokens=True)
        token_id, added = tokenizer.convert_tokens_to_ids(mask_token), True
    if token_id >= embedding_rows(model):
        from transformers.utils import logging as hf_logging

        # transformers announces, as a warning on every run, that the new rows start from the old rows' mean and
        # covariance: the initialisation asked for here, so the notice is held back (errors still show).
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    return int(token_id), added


def noise_token_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Ids that partial-reveal noise may draw: every id below `vocab_size` that is not a special/added token."""
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    keep = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
    return torch.tensor(keep, dtype=torch.long)


def greedy_generate(lm: PreTrainedModel, ids: list[int], max_new_tokens: int, eos_token_ids: tuple[int, ...] = (),
                    pad_token_id: int | None = None, suppress: tuple[int, ...] = ()) -> list[int]:
    """transformers' own greedy decoding (`generate(do_sample=False)`) of one prompt: the reference outputs are
    compared with. Its config is built here, so sampling or penalties in the model's generation_config.json
    cannot turn it into something else; `suppress` bans tokens (a draft-only model's mask token, which its base
    model does not have)."""
    return generate_batch(lm, [ids], max_new_tokens, eos_token_ids, pad_token_id, suppress)[0]


def generate_batch(lm: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int,
                   eos_token_ids: tuple[int, ...] = (), pad_token_id: int | None = None, suppress: tuple[int, ...] = (),
                   temperature: float | None = None, assistant_model: Any = None, top_k: int = 0, top_p: float = 1.0,
                   **config: Any) -> list[list[int]]:
    """transformers' `generate` over a left-padded batch, greedy (or, with `temperature`, sampling, by default from
    the model's whole distribution: top-k 0, top-p 1; seed torch first); each row's tokens end at its first EOS
    (generate pads the rows that finished early). `config` adds generation settings (a static cache,
    prompt-lookup decoding); `assistant_model` runs assisted generation."""
    from transformers import GenerationConfig

    eos = list(eos_token_ids) or None
    pad = pad_token_id if pad_token_id is not None else (eos or [0])[0]
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature,
                                                                  "top_k": top_k, "top_p": top_p}
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              suppress_tokens=list(suppress) or None, **config)
    device = next(lm.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        extra = {"assistant_model": assistant_model} if assistant_model is not None else {}
        try:
            out = lm.generate(input_ids, attention_mask=attention, generation_config=config, **extra)
        except RuntimeError as e:  # torch.multinomial's refusal, deep in transformers' sampling loop
            if temperature is None or "probability tensor contains" not in str(e):
                raise
            raise FluidError(f"temperature = {temperature:g}: transformers' generate cannot sample at it (its float32 "
                             "logits divided by the temperature overflow, or the model's logits are NaN); use a "
                             "larger temperature") from None
    rows = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if eos and t in eos), len(row))
        rows.append(row[:end])
    return rows
