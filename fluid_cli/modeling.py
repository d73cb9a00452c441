"""Model loading, the mask token, LoRA, the Stage I loss, and the FLUID directory format.

A FLUID model directory holds:
- the backbone: a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) over `base_model`, or full
  weights (`config.json`, `model.safetensors`) for fully fine-tuned or scratch-grown models;
- the tokenizer (with the mask token);
- `k_head.safetensors`, the Diffusion K-Head;
- `fluid.json`: format version, base model reference, mask token and id, K, the K-head's objective and
  calibration settings. It is written last, so a directory with `fluid.json` is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fluid_cli.config import FluidConfig, LoraSection, ModelConfig, ScratchModelConfig
from fluid_cli.errors import FluidError
from fluid_cli.io import write_json_atomic
from fluid_cli.khead import KHead
from fluid_cli.layout import IGNORE, MAIN, MASK_SLOT, ExpandedBatch

FORMAT_VERSION = 1
META_NAME = "fluid.json"
KHEAD_NAME = "k_head.safetensors"


@dataclass
class FluidMeta:
    mask_token: str
    mask_token_id: int
    max_k: int
    vocab_size: int
    weights: str = "adapter"  # "adapter" (peft over base_model) or "full"
    base_model: str | None = None
    trust_remote_code: bool = False
    khead: dict[str, Any] = field(default_factory=lambda: {"objective": "gaussian", "calibrated": False})
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, folder: str | Path) -> FluidMeta:
        folder = Path(folder)
        path = folder / META_NAME
        if not folder.is_dir():
            raise FluidError(f"{folder}: model directory not found")
        if not path.is_file():
            raise FluidError(
                f"{folder}: not a FLUID model directory (no {META_NAME}); "
                "train one with `fluid train-stage1`, or use a plain model with `--horizon fixed` / `--decoder ar`"
            )
        try:
            raw = json.loads(path.read_text())
            meta = cls(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise FluidError(f"{path}: unreadable FLUID metadata ({e})") from None
        if meta.format_version > FORMAT_VERSION:
            raise FluidError(
                f"{path}: format version {meta.format_version} is newer than this fluid supports "
                f"({FORMAT_VERSION}); upgrade fluid-cli"
            )
        return meta


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

    def hidden_states(self, **inputs: Any) -> Any:
        """Run the decoder stack only (no LM head): returns the transformers output with `last_hidden_state`."""
        return self.lm.get_decoder()(**inputs)

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

    def forward(self, input_ids: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One forward: `(logits, last hidden states, past_key_values)` over every input position."""
        out = self.hidden_states(input_ids=input_ids, **inputs)
        hidden = out.last_hidden_state
        return self.logits(hidden), hidden, getattr(out, "past_key_values", None)

    # -- Stage I ------------------------------------------------------------------------------------------
    def stage1_loss(self, ex: ExpandedBatch, ar_weight: float = 1.0, diff_weight: float = 1.0) -> Stage1Loss:
        """`L = ar_weight * L_AR + diff_weight * L_Diff` over an expanded batch (METHOD 1.4).

        Each part is the mean token cross-entropy over its own labels (main tokens / mask slots). Logits are
        computed only at labelled slots, which keeps memory flat for large vocabularies.
        """
        dtype = next(self.lm.parameters()).dtype
        hidden = self.hidden_states(**ex.model_inputs(dtype if dtype.is_floating_point else torch.float32))
        hidden = hidden.last_hidden_state
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
        return Stage1Loss(ar_weight * loss_ar + diff_weight * loss_diff, loss_ar, loss_diff, n_ar, n_diff)

    # -- saving and loading -------------------------------------------------------------------------------
    def save(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the FLUID directory. Files are staged in a temporary folder and moved in; `fluid.json` last.

        `state_dict` (the backbone's, e.g. gathered from FSDP shards) replaces the backbone's own weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=folder, prefix=".save."))
        try:
            is_peft = hasattr(self.backbone, "peft_config")
            self.meta.weights = "adapter" if is_peft else "full"
            self.backbone.save_pretrained(stage, state_dict=state_dict)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(stage)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.khead.state_dict().items()},
                      stage / KHEAD_NAME)
            (folder / META_NAME).unlink(missing_ok=True)  # the folder is incomplete until the end
            for item in stage.iterdir():
                target = folder / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
            write_json_atomic(folder / META_NAME, asdict(self.meta))
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def save_khead(self, folder: str | Path) -> None:
        """Rewrite only the K-head and `fluid.json` (after calibration), each atomically."""
        folder = Path(folder)
        tmp = folder / f".{KHEAD_NAME}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.khead.state_dict().items()}, tmp)
        os.replace(tmp, folder / KHEAD_NAME)
        write_json_atomic(folder / META_NAME, asdict(self.meta))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        merge: bool = False,
        attn_implementation: str | None = None,
    ) -> FluidModel:
        """Load a FLUID directory. `merge=True` folds a LoRA adapter into the weights (faster inference)."""
        folder = Path(folder)
        meta = FluidMeta.read(folder)
        common = {"dtype": dtype or torch.float32, "trust_remote_code": meta.trust_remote_code}
        if attn_implementation:
            common["attn_implementation"] = attn_implementation
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=meta.trust_remote_code)
        if meta.weights == "full":
            backbone = _from_pretrained(str(folder), **common)
        else:
            from peft import PeftModel

            if not meta.base_model:
                raise FluidError(f"{folder / META_NAME}: adapter weights but no base_model recorded")
            base = _from_pretrained(meta.base_model, **common)
            if embedding_rows(base) < meta.vocab_size:
                base.resize_token_embeddings(meta.vocab_size)
            backbone = PeftModel.from_pretrained(base, folder)
            if merge:
                backbone = backbone.merge_and_unload()
        embeddings = embedding_rows(backbone)
        if embeddings < meta.vocab_size or meta.mask_token_id >= embeddings:
            raise FluidError(
                f"{folder}: model has {embeddings} embeddings but {META_NAME} expects {meta.vocab_size} "
                f"(mask token id {meta.mask_token_id}); the directory does not match its base model"
            )
        khead = KHead(hidden_size_of(backbone.config), meta.max_k)
        khead_path = folder / KHEAD_NAME
        if not khead_path.is_file():
            raise FluidError(f"{folder}: {KHEAD_NAME} is missing")
        try:
            khead.load_state_dict(load_file(khead_path))
        except RuntimeError as e:
            raise FluidError(f"{khead_path}: K-head does not match the model (K={meta.max_k}): {e}") from None
        model = cls(backbone, khead.to(common["dtype"] if isinstance(common["dtype"], torch.dtype) else torch.float32),
                    meta, tokenizer)
        if device is not None:
            model.to(device)
        return model.eval()


def embedding_rows(model: Any) -> int:
    """Rows of the input embedding (peft may wrap the layer, so read the weight's shape)."""
    emb = model.get_input_embeddings()
    weight = emb.base_layer.weight if hasattr(emb, "base_layer") else emb.weight
    return int(weight.shape[0])


def hidden_size_of(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def _from_pretrained(path: str, **kwargs: Any) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FluidError(f"{path}: cannot load a causal LM ({first})") from None


def load_pretrained(cfg: ModelConfig) -> tuple[PreTrainedModel, Any]:
    """The base causal LM and tokenizer named by `[model] path` (local folder or hub id)."""
    if cfg.path is None:
        raise FluidError("[model] path: no model given (set path, or [model.scratch] to grow one)")
    if os.path.isdir(cfg.path) is False and (cfg.path.startswith((".", "/")) or os.path.exists(cfg.path)):
        raise FluidError(f"[model] path: {cfg.path} is not a folder")
    model = _from_pretrained(
        cfg.path, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    return model, load_tokenizer(cfg)


def load_tokenizer(cfg: ModelConfig, corpus: Callable[[], Iterable[str]] | None = None) -> Any:
    """The tokenizer a recipe's model uses: for `[model.scratch]` one built at run time (a BPE is trained on
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
        raise FluidError("[model] path: no model given (set path, or [model.scratch] to grow one)")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FluidError(f"{name}: cannot load a tokenizer ({str(e).strip().splitlines()[0]})") from None


def build_scratch_model(cfg: ScratchModelConfig, tokenizer: Any, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture, sized for `tokenizer`."""
    try:
        config = AutoConfig.for_model(
            cfg.architecture,
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    except ValueError as e:
        raise FluidError(f"[model.scratch] architecture: {e}") from None
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config)


def resolve_mask_token(tokenizer: Any, model: PreTrainedModel, cfg: FluidConfig) -> tuple[int, bool]:
    """Find `[fluid] mask_token` in the vocabulary, or add it as a special token and grow the embeddings.

    Returns `(mask_token_id, added)`.
    """
    vocab = tokenizer.get_vocab()
    if cfg.mask_token in vocab:
        token_id = vocab[cfg.mask_token]
        added = False
    elif not cfg.add_mask_token:
        raise FluidError(
            f"[fluid] mask_token: {cfg.mask_token!r} is not in the tokenizer's vocabulary and "
            "add_mask_token = false (name an existing reserved token, or allow adding it)"
        )
    else:
        tokenizer.add_tokens([AddedToken(cfg.mask_token, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(cfg.mask_token)
        added = True
    if token_id >= embedding_rows(model):
        model.resize_token_embeddings(len(tokenizer))
    return int(token_id), added


def apply_lora(model: PreTrainedModel, cfg: LoraSection, mask_token_id: int) -> nn.Module:
    """Wrap `model` with LoRA adapters; the mask token's embedding row is trained too (peft trainable tokens)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        trainable_token_indices=[mask_token_id],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def noise_token_ids(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Ids that partial-reveal noise may draw: every id below `vocab_size` that is not a special/added token."""
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    keep = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
    return torch.tensor(keep, dtype=torch.long)
