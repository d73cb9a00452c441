"""LoRA through peft, and the draft-only gate that keeps main rows on the frozen base weights.

Two scopes (`[lora] scope`):

- `all` (the original method): the adapter acts on every row; its deltas can be merged into the weights for
  decoding, and verified output equals greedy decoding of the *adapted* model.
- `draft`: the adapter acts only on block rows (mask slots and the tokens revealed inside a block). Every main row
  runs through the frozen base weights, bit for bit, in the same forward, so verified output equals greedy
  decoding of the *original* model.

Why a gate of our own: peft's LoRA has no per-token switch. Its activated-LoRA variant (aLoRA) selects the adapted
rows with a boolean mask inside every layer (a device-to-host synchronisation per layer, and new hooks registered
on every call). Here the adapted rows are always a suffix of the sequence dimension: Stage I lays every block out
after the main tokens, and the decoder feeds its draft rows after its main rows. So the gate is one number, the
first adapted column, shared by all LoRA layers: each computes `base(x)` on every row and the LoRA delta only on
`x[:, start:]`, added in place. A forward with no draft rows does no LoRA work at all. The gate replaces the
`forward` of peft's own LoRA `Linear` modules (same parameters, names and saved files), so saving, loading and
`PeftModel` behave as usual; `start = None` means no adapted rows (the base model).

The mask token's trainable embedding row needs no gate: the mask token only ever appears in block rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluid_cli.compat import peft_wrapping
from fluid_cli.errors import FluidError, first_line

STACK_LIMIT = 16_000_000  # adapted-layer weights up to which decoding stacks base and adapted weights


def apply_lora(model: nn.Module, *, r: int, alpha: int, dropout: float, target_modules: str | list[str],
               mask_token_id: int) -> nn.Module:
    """Wrap `model` with LoRA adapters; the mask token's embedding row is trained too (peft trainable tokens)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        trainable_token_indices=[mask_token_id],
        task_type="CAUSAL_LM",
    )
    try:
        with peft_wrapping():
            return get_peft_model(model, lora)
    except ValueError as e:  # e.g. target_modules naming no module of this model
        raise FluidError(f"[lora] target_modules: {first_line(e)}") from None


def load_lora(base: nn.Module, folder: str | Path) -> nn.Module:
    """The peft adapter saved in `folder` on top of `base` (one-line errors for a corrupt adapter)."""
    from peft import PeftModel

    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(base, folder)
    except Exception as e:  # noqa: BLE001 - peft and safetensors raise many types for a broken adapter file
        raise FluidError(f"{folder}: cannot load the LoRA adapter ({first_line(e)}); the adapter files are damaged "
                         "or do not match the base model") from None


class DraftGate:
    """The first sequence column that the adapter acts on (None: none). See the module docstring."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.layers: list[Any] = []

    def install(self, model: nn.Module) -> DraftGate:
        """Gate every LoRA `Linear` of a peft model. Refuses adapters the gate cannot express exactly."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if not isinstance(module, LoraLinear) or module.lora_variant:
                raise FluidError(f"LoRA layer {name} ({type(module).__name__}"
                                 f"{', a variant such as DoRA' if getattr(module, 'lora_variant', None) else ''}): "
                                 "draft-only scope supports plain LoRA on linear layers; use [lora] scope = \"all\"")
            module.forward = _gated_forward.__get__(module)  # bound to the module, reads the shared gate
            module._fluid_gate = self
            module._fluid_stacked = None
            self.layers.append(module)
        if not self.layers:
            raise FluidError("draft-only scope: the model has no LoRA layers to gate")
        self.model = model
        return self

    def freeze_for_decoding(self, stack_limit: int = STACK_LIMIT) -> None:
        """Fix the adapter for decoding (its weights must not change afterwards).

        The mask row is merged into the embedding once (peft's trainable-token wrapper would otherwise copy the
        whole embedding matrix in every forward); it only ever meets draft rows. And when the adapted layers
        hold at most `stack_limit` weights, a forward over a tiny model is mostly per-operation overhead, not
        arithmetic: each layer then keeps `W` and `W + s B A` and runs the main rows through the first, the draft
        rows through the second (two matmuls where the low-rank path runs four, and no in-place add). Large models
        keep the low-rank path: doubling their weights would double the memory traffic that bounds their
        forwards.
        """
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        for module in self.model.modules():
            if isinstance(module, TrainableTokensLayer) and not module.merged:
                module.merge()
        if sum(m.base_layer.weight.numel() for m in self.layers) > stack_limit:
            return
        with torch.no_grad():
            for m in self.layers:
                weight = m.base_layer.weight
                adapted = weight.clone()
                for name in m.active_adapters:
                    if name in m.lora_A:
                        delta = m.lora_B[name].weight.float() @ m.lora_A[name].weight.float() * m.scaling[name]
                        adapted += delta.to(weight.dtype)
                m._fluid_stacked = (weight, m.base_layer.bias, adapted, m.base_layer.bias)

    @contextmanager
    def rows_from(self, start: int | None) -> Iterator[None]:
        """Adapt columns `start:` for the forwards inside the block (None: the base model only)."""
        previous, self.start = self.start, start
        try:
            yield
        finally:
            self.start = previous


def _gated_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA `Linear.forward`, restricted to the gate's columns (`x` is `[batch, seq, features]`)."""
    start = self._fluid_gate.start
    frozen = self._fluid_stacked
    if frozen is not None:  # decoding a small model: base weights for main rows, adapted weights for draft rows
        weight, bias, adapted, adapted_bias = frozen
        if start is None or start >= x.shape[1]:
            return F.linear(x, weight, bias)
        return torch.cat([F.linear(x[:, :start], weight, bias), F.linear(x[:, start:], adapted, adapted_bias)], 1)
    base = self.base_layer
    if start is None or start >= x.shape[-2] or self.disable_adapters or self.merged:
        return base(x, *args, **kwargs)
    if x.dim() != 3:  # the gate's columns are the sequence dimension of [batch, seq, features]
        raise FluidError(f"draft-only LoRA: a linear layer got a {x.dim()}-D input; use [lora] scope = \"all\"")
    result = base(x, *args, **kwargs)
    rows = x[:, start:]
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        inputs = self.lora_dropout[name](rows) if self.training else rows
        delta = F.linear(F.linear(inputs.to(lora_a.weight.dtype), lora_a.weight), lora_b.weight)
        if start == 0:
            result = result + delta.to(result.dtype) * self.scaling[name]
        else:
            result[:, start:].add_(delta.to(result.dtype), alpha=self.scaling[name])
    return result
