"""`FluidModel`: a causal LM (plain or peft-wrapped), its K-head and FLUID metadata, and the Stage I loss.

The model layer takes plain arguments. Reading and writing a model folder is `fluid_cli.folder`; loading
transformers models and tokenizers is `fluid_cli.hf`; LoRA and the draft-only gate are `fluid_cli.lora`.

Every forward names the first *draft* column (`draft_from`): columns before it are main rows (committed tokens,
the ordinary causal LM), columns from it on are block rows (mask slots and the tokens revealed inside a block).
With a draft-only adapter (`lora_scope = "draft"`) only the block rows go through the LoRA deltas; with no
adapter, or one that acts everywhere, the argument changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from fluid_cli.errors import FluidError
from fluid_cli.hf import hidden_size_of
from fluid_cli.khead import KHead, KHeadMeta
from fluid_cli.layout import IGNORE, MAIN, MASK_SLOT, ExpandedBatch
from fluid_cli.lora import DraftGate

FORMAT_VERSION = 2
DEFAULT_MAX_K = 16


@dataclass
class FluidMeta:
    """What `fluid.json` records about a FLUID model (see `fluid_cli.folder` for the file)."""

    mask_token: str
    mask_token_id: int
    max_k: int
    vocab_size: int
    # adapter: a peft adapter over `base_model`; full: complete weights (full fine-tuning, scratch); plain: a
    # transformers model wrapped at load time (never saved)
    weights: Literal["adapter", "full", "plain"] = "adapter"
    lora_scope: Literal["draft", "all"] | None = None  # adapters only: where the LoRA deltas act
    base_model: str | None = None
    trust_remote_code: bool = False
    khead: KHeadMeta = field(default_factory=KHeadMeta)
    format_version: int = FORMAT_VERSION

    @property
    def exact_to(self) -> str:
        """Whose greedy decoding verified output equals: the original model's (`base`), or these weights' own
        (`adapted`: LoRA on every row, or fine-tuned/scratch weights)."""
        return "base" if self.weights == "plain" or self.lora_scope == "draft" else "adapted"


@dataclass
class Stage1Loss:
    loss: torch.Tensor
    loss_ar: torch.Tensor
    loss_diff: torch.Tensor
    n_ar: int  # trained main-token labels
    n_diff: int  # trained mask-slot labels


class FluidModel(nn.Module):
    """A causal LM (plain or peft-wrapped) plus its K-head and FLUID metadata."""

    def __init__(self, backbone: nn.Module, khead: KHead, meta: FluidMeta, tokenizer: Any = None):
        super().__init__()
        self.backbone = backbone
        self.khead = khead
        self.meta = meta
        self.tokenizer = tokenizer
        gated = meta.lora_scope == "draft" and hasattr(backbone, "peft_config")
        self.gate = DraftGate().install(backbone) if gated else None
        # The mask is one of the base model's own tokens (a reserved one), not added for FLUID: a draft-only model's
        # main rows then keep the base's logit for it, else its distribution would not be the base model's.
        # Set by the loader, which sees the base's vocabulary before any resize.
        self.mask_in_base = False

    @classmethod
    def from_plain(cls, lm: PreTrainedModel, tokenizer: Any, *, mask_token: str | None = None,
                   max_k: int | None = None, source: str | None = None) -> FluidModel:
        """A plain causal LM as a FluidModel: no training, an uncalibrated K-head, and an existing token as the
        mask (`mask_token`, else the tokenizer's unk, then pad token). Its drafts come from a model never trained
        to fill masks, so they are poor, but verified output is still exactly its greedy decoding."""
        name = mask_token or tokenizer.unk_token or tokenizer.pad_token
        where = source or "the model"
        if name is None:
            raise FluidError(f"{where}: the tokenizer has no unk or pad token to draft with: name an existing token "
                             "as the mask ([generate] mask_token, e.g. --set generate.mask_token=TOKEN)")
        mask_id = tokenizer.convert_tokens_to_ids(name)
        if mask_id is None or (mask_token and mask_id == tokenizer.unk_token_id and name != tokenizer.unk_token):
            raise FluidError(f"mask_token {name!r}: not a token of {where}'s tokenizer")
        k = max_k or DEFAULT_MAX_K
        meta = FluidMeta(mask_token=name, mask_token_id=int(mask_id), max_k=k, vocab_size=len(tokenizer),
                         weights="plain", base_model=source)
        dtype = next(lm.parameters()).dtype
        khead = KHead(hidden_size_of(lm.config), k).to(device=next(lm.parameters()).device, dtype=dtype)
        return cls(lm, khead, meta, tokenizer).eval()

    # -- the pieces of the causal LM ----------------------------------------------------------------------
    @property
    def lm(self) -> PreTrainedModel:
        """The transformers model (with LoRA layers injected when the backbone is a peft model)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    @property
    def mask_token_id(self) -> int:
        return self.meta.mask_token_id

    @property
    def max_k(self) -> int:
        return self.meta.max_k

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def hidden_states(self, *, draft_from: int | None = None, **inputs: Any) -> Any:
        """Run the decoder stack only (no LM head): the transformers output with `last_hidden_state`.

        `draft_from`: the first block column (None: every row is a main row)."""
        decoder = self.lm.get_decoder()
        if self.gate is None:
            return decoder(**inputs)
        with self.gate.rows_from(draft_from):
            return decoder(**inputs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # What some models' forwards do to the head's output (the decoder stack alone does not): Granite divides
        # by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma soft-caps.
        logits = self.lm.get_output_embeddings()(hidden)
        config = self.lm.config
        if getattr(config, "logits_scaling", None):
            logits = logits / config.logits_scaling
        if getattr(config, "logit_scale", None):
            logits = logits * config.logit_scale
        if getattr(config, "final_logit_softcapping", None):
            logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
        return logits

    def forward(self, input_ids: torch.Tensor, *, draft_from: int | None = None, **inputs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward: `(logits, last hidden states)` over every input position."""
        hidden = self.hidden_states(input_ids=input_ids, draft_from=draft_from, **inputs).last_hidden_state
        return self.logits(hidden), hidden

    # -- Stage I ------------------------------------------------------------------------------------------
    def stage1_loss(self, ex: ExpandedBatch, ar_weight: float = 1.0, diff_weight: float = 1.0) -> Stage1Loss:
        """`L = ar_weight * L_AR + diff_weight * L_Diff` over an expanded batch (METHOD 1.4).

        Each part is the mean token cross-entropy over its own labels (main tokens / mask slots). Logits are
        computed only at labelled slots, which keeps memory flat for large vocabularies. With a draft-only adapter
        the main rows run the frozen base weights, so `L_AR` is the base model's loss (logged, not trained).
        """
        dtype = self.dtype
        inputs = ex.model_inputs(dtype if dtype.is_floating_point else torch.float32)
        if self.gate is not None:
            # Set for the whole step, not just this call: layers under gradient checkpointing run their forward
            # again during backward, and must gate the same columns then.
            self.gate.start = ex.num_main
        hidden = self.lm.get_decoder()(**inputs).last_hidden_state
        trained = ex.labels != IGNORE
        parts = []
        for slot_type in (MAIN, MASK_SLOT):
            sel = trained & (ex.slot_type == slot_type)
            n = int(sel.sum())
            if n == 0:  # keep the graph connected so every rank runs the same backward
                parts.append((hidden.sum() * 0.0, 0))
                continue
            logits = self.logits(hidden[sel]).float()
            parts.append((F.cross_entropy(logits, ex.labels[sel]), n))
        (loss_ar, n_ar), (loss_diff, n_diff) = parts
        loss = ar_weight * loss_ar + diff_weight * loss_diff
        if torch.is_grad_enabled() and not loss.requires_grad:
            # A draft-only batch without blocks touches no trainable weight; a zero that does keeps backward (and
            # every data-parallel rank's gradient reduction) uniform.
            loss = loss + sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return Stage1Loss(loss, loss_ar, loss_diff, n_ar, n_diff)
