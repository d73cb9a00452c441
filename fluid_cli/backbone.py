"""A recipe's `[model]` table -> the transformers model and tokenizer it names: pretrained, or grown from scratch.

The commands that start from a recipe's model (`prepare-data`, `train-stage1`, self-distillation) call these; they
translate the table into the plain-argument calls of `fluid_cli.hf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from fluid_cli.config import ModelConfig
from fluid_cli.errors import FluidError
from fluid_cli.hf import build_scratch_model, load_causal_lm, load_tokenizer, resolve_dtype

NO_MODEL = "[model] path: no model given (set path, or [model.scratch] to grow one)"


def recipe_tokenizer(cfg: ModelConfig, corpus: Callable[[], Iterable[str]] | None = None) -> Any:
    """The tokenizer of the recipe's model: for `[model.scratch]` one built at run time (a BPE is trained on
    `corpus()`, which only `prepare-data` has), else the pretrained one at `[model] tokenizer` (or `path`)."""
    if cfg.scratch is not None:
        from fluid_cli.tokenizer import build_bpe_tokenizer, build_char_tokenizer

        if cfg.scratch.tokenizer == "char":
            return build_char_tokenizer()
        if corpus is None:
            raise FluidError("[model.scratch] tokenizer = \"bpe\" is trained by `fluid prepare-data` on the data; "
                             "prepare the data first (its tokenizer/ folder is then used)")
        return build_bpe_tokenizer(corpus(), cfg.scratch.tokenizer_vocab_size)
    name = cfg.tokenizer or cfg.path
    if name is None:
        raise FluidError(NO_MODEL)
    return load_tokenizer(name, trust_remote_code=cfg.trust_remote_code)


def recipe_lm(cfg: ModelConfig, tokenizer: Any) -> PreTrainedModel:
    """The recipe's causal LM: pretrained from `[model] path`, or randomly initialised per `[model.scratch]` and
    sized for `tokenizer`."""
    if cfg.scratch is not None:
        shape = {k: v for k, v in dataclasses.asdict(cfg.scratch).items() if not k.startswith("tokenizer")}
        return build_scratch_model(tokenizer, attn_implementation=cfg.attn_implementation, **shape)
    if cfg.path is None:
        raise FluidError(NO_MODEL)
    dtype = "auto" if cfg.dtype == "auto" else resolve_dtype(cfg.dtype)  # "auto": the checkpoint's own
    return load_causal_lm(cfg.path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                          attn_implementation=cfg.attn_implementation)


def model_reference(path: str) -> str:
    """How `fluid.json` names a base model: an absolute path for a local folder (loadable from anywhere), else
    the hub id as given."""
    return str(Path(path).resolve()) if Path(path).is_dir() else path
