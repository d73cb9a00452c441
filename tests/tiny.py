"""Tiny random models and a tiny tokenizer, built in-process (no downloads)."""

from __future__ import annotations

import torch

from fluid_cli.config import FluidConfig
from fluid_cli.hf import build_scratch_model
from fluid_cli.khead import KHead
from fluid_cli.model import FluidMeta, FluidModel
from fluid_cli.tokenizer import MASK, build_char_tokenizer

# Architectures the invariants are checked on (transformers model_type names).
ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "olmo2", "phi3", "granite"]


# A recipe's model tables for a tiny Llama grown from scratch (full fine-tuning), for end-to-end tests.
TINY_SCRATCH_RECIPE = """
[model.scratch]
architecture = "llama"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 256

[lora]
enabled = false
"""


def tiny_tokenizer():
    return build_char_tokenizer()


def tiny_model(arch: str = "llama", tokenizer=None, hidden: int = 32, layers: int = 2, seed: int = 0,
               attn: str = "sdpa"):
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    return build_scratch_model(tokenizer, architecture=arch, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, attn_implementation=attn).eval()


def sharpen(lm, seed: int = 0) -> None:
    """Give a random tiny model an untied random LM head, scaled up: its greedy text does not collapse into one
    repeated token (a tied head copies the current token), its drafts are confident and often wrong, and its top two
    logits stay far apart (no near-ties between batched and unbatched forwards)."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 12 / lm.config.hidden_size**0.5)
    lm.config.tie_word_embeddings = False
    lm.set_output_embeddings(head)


def tiny_fluid_model(arch: str = "llama", max_k: int = 4, seed: int = 0, **kw) -> FluidModel:
    tok = tiny_tokenizer()
    model = tiny_model(arch, tok, seed=seed, **kw)
    meta = FluidMeta(mask_token=MASK, mask_token_id=tok.convert_tokens_to_ids(MASK), max_k=max_k,
                     vocab_size=len(tok), weights="full")
    torch.manual_seed(seed + 1)
    return FluidModel(model, KHead(model.config.hidden_size, max_k), meta, tok).eval()


def fluid_config(**kw) -> FluidConfig:
    return FluidConfig(**{"mask_token": MASK, **kw})
