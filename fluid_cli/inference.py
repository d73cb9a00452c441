"""A recipe's `[generate]` table -> the model to decode and the decoder's settings.

What `fluid generate`, `fluid bench decode`, `fluid eval` and `fluid demo` share: the model comes from the one
loader (`fluid_cli.folder.load_for_inference`: a FLUID folder, or a plain transformers folder), the settings from
the table, with the model's EOS tokens and the stop strings as a decoder callback.
"""

from __future__ import annotations

from dataclasses import replace

from fluid_cli.acceptance import GREEDY, Sampling
from fluid_cli.config import GenerateConfig, Recipe
from fluid_cli.decode import DecodeSettings, Request
from fluid_cli.errors import FluidError
from fluid_cli.folder import load_for_inference
from fluid_cli.hf import eos_token_ids
from fluid_cli.model import FluidModel
from fluid_cli.prompts import stop_strings


def generate_config(recipe: Recipe) -> GenerateConfig:
    """The `[generate]` table; a recipe file's model defaults to the model its `[train]` table writes."""
    cfg = recipe.generate
    if cfg.model_dir is None and recipe.source is not None:
        cfg = replace(cfg, model_dir=recipe.train.output_dir)
    return cfg


def load_decoding_model(cfg: GenerateConfig) -> FluidModel:
    """The model `[generate] model_dir` names (`--model`)."""
    if cfg.model_dir is None:
        raise FluidError("no model: pass --model DIR (or set [generate] model_dir in the recipe)")
    return load_for_inference(cfg.model_dir, device=cfg.device, dtype=cfg.dtype, mask_token=cfg.mask_token,
                              max_k=cfg.max_k)


def sampling(cfg: GenerateConfig) -> Sampling:
    """The `[generate]` sampling keys (greedy when temperature is unset or 0)."""
    if not cfg.temperature:
        return GREEDY
    return Sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed)


def requests(prompts: list[list[int]], sampling: Sampling) -> list[Request]:
    """One decoder request per prompt; with a seed, prompt `i` samples with `seed + i` (the same prompt twice gives
    two samples, and a prompt's text does not depend on the batch it is decoded in as long as its horizons do not:
    the default cost policy's depend on the forward costs measured for the batch size, so there it may differ)."""
    if sampling.greedy or sampling.seed is None:
        return [Request(p) for p in prompts]
    return [Request(p, sampling=sampling.nth(i)) for i, p in enumerate(prompts)]


def decode_settings(cfg: GenerateConfig, model: FluidModel) -> DecodeSettings:
    return DecodeSettings(
        horizon=cfg.horizon, tau=cfg.tau, threshold=cfg.threshold, max_k=cfg.max_k, min_k=cfg.min_k,
        verify=cfg.verify, max_new_tokens=cfg.max_new_tokens, eos_token_ids=eos_token_ids(model.tokenizer, model.lm),
        stop=stop_strings(model.tokenizer, cfg.stop), compile=cfg.compile, sampling=sampling(cfg),
    )
