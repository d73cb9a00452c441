"""The FLUID model folder: what it holds, writing it so that it is always complete, and the one loader.

A FLUID model folder holds:
- the backbone: a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) over `base_model`, or full
  weights (`config.json`, `model.safetensors`) for fully fine-tuned or scratch-grown models;
- the tokenizer (with the mask token);
- `k_head.safetensors`, the Diffusion K-Head;
- `fluid.json` (`FluidMeta`): format version, base model, LoRA scope, mask token and id, K, and the K-head's
  calibration (`KHeadMeta`). It is the completeness marker: written last, through `io.replace_files`, so a kill at
  any moment leaves either the previous complete model or the new one (finished by the next reader).

`load_model` turns a FLUID folder into a `FluidModel`; `load_for_inference` also takes a plain transformers model
folder (wrapped by `FluidModel.from_plain`). Every command that decodes, evaluates or calibrates loads through them.
Every failure a user can cause is one `FluidError` line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from fluid_cli.config import build_typed
from fluid_cli.errors import FluidError, first_line
from fluid_cli.hf import (
    check_weight_files,
    embedding_rows,
    hidden_size_of,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from fluid_cli.io import recover_files, replace_files
from fluid_cli.khead import KHead
from fluid_cli.lora import load_lora
from fluid_cli.model import FORMAT_VERSION, FluidMeta, FluidModel

META_NAME = "fluid.json"
KHEAD_NAME = "k_head.safetensors"
REMEDY = "re-run `fluid train-stage1` (and `fluid calibrate-khead`) to write it again"


# --------------------------------------------------------------------------------------------- fluid.json


class _MetaWhere:
    def __init__(self, path: Path):
        self.path = path

    def error(self, keypath: tuple[str | int, ...], message: str) -> FluidError:
        key = ".".join(str(k) for k in keypath) or "the file"
        return FluidError(f"{self.path}: {key}: {message} (the file is damaged or was not written by fluid; {REMEDY})")


def is_fluid_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    if not folder.is_dir():
        return False
    _recover(folder)
    return (folder / META_NAME).is_file()


def _recover(folder: Path) -> None:
    """Finish a save that a kill interrupted (see `io.replace_files`)."""
    try:
        recover_files(folder, META_NAME)
    except OSError as e:
        raise FluidError(f"{folder}: an interrupted save left the model incomplete and it cannot be finished "
                         f"here ({e.strerror}); make the folder writable and retry") from None


def read_meta(folder: str | Path) -> FluidMeta:
    """`fluid.json`, checked field by field (finishing an interrupted save first)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FluidError(f"{folder}: model folder not found" if not folder.exists() else
                         f"{folder}: not a folder (a FLUID model is a folder with {META_NAME})")
    _recover(folder)
    path = folder / META_NAME
    if not path.is_file():
        raise FluidError(
            f"{folder}: not a FLUID model folder (no {META_NAME}); train one with `fluid train-stage1`, or decode a "
            "plain transformers model with `--horizon fixed` / `--decoder ar`"
        )
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FluidError(f"{path}: not UTF-8 text (the file is damaged; {REMEDY})") from None
    except json.JSONDecodeError as e:
        raise FluidError(f"{path}: unreadable JSON at line {e.lineno} ({e.msg}; the file is damaged; {REMEDY})") \
            from None
    where = _MetaWhere(path)
    if not isinstance(raw, dict):
        raise where.error((), "expected a JSON object")
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise where.error(("format_version",), f"expected an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise FluidError(f"{path}: format version {version} is newer than this fluid supports ({FORMAT_VERSION}); "
                         "upgrade fluid-cli")
    if version == 1:
        raw = _from_version_1(raw)
    meta = build_typed(FluidMeta, raw, (), where)
    if meta.max_k < 1:
        raise where.error(("max_k",), f"must be at least 1, got {meta.max_k}")
    if not 0 <= meta.mask_token_id < meta.vocab_size:
        raise where.error(("mask_token_id",), f"{meta.mask_token_id} is outside the vocabulary of {meta.vocab_size}")
    if meta.weights == "adapter" and not meta.base_model:
        raise where.error(("base_model",), "adapter weights need the base model they adapt")
    if meta.weights == "adapter" and meta.lora_scope is None:
        raise where.error(("lora_scope",), "adapter weights need their scope (\"draft\" or \"all\")")
    if meta.weights != "adapter" and meta.lora_scope is not None:
        raise where.error(("lora_scope",), f"a scope for {meta.weights} weights, which have no adapter")
    has_adapter = (folder / "adapter_config.json").is_file()
    if has_adapter != (meta.weights == "adapter"):
        raise where.error(("weights",), f"says {meta.weights!r}, but the folder "
                                        f"{'holds' if has_adapter else 'has no'} adapter_config.json")
    return meta


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (before draft-only LoRA): every adapter acted on every row; the K-head settings were a dict."""
    raw = dict(raw)
    khead = dict(raw.get("khead") or {})
    khead.pop("K", None)
    khead.setdefault("objective", "gaussian")
    raw["khead"] = khead
    if raw.get("weights", "adapter") == "adapter":
        raw["lora_scope"] = "all"
    raw["format_version"] = FORMAT_VERSION
    return raw


def meta_json(meta: FluidMeta) -> str:
    return json.dumps(dataclasses.asdict(meta), indent=2) + "\n"


# --------------------------------------------------------------------------------------------- saving


def save_model(model: FluidModel, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the whole FLUID folder (see the module docstring); `state_dict` (the backbone's, e.g. gathered from
    FSDP shards) replaces the backbone's own weights."""
    is_peft = hasattr(model.backbone, "peft_config")
    if model.meta.weights == "plain":
        raise FluidError("a plain model wrapped for decoding is not saved as a FLUID model; train it first")
    model.meta.weights = "adapter" if is_peft else "full"
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar around the commands' own output

    def write(stage: Path) -> None:
        with warnings.catch_warnings():
            # peft saves the embedding rows of an added mask token, as the folder needs, and warns so on every save
            warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
            model.backbone.save_pretrained(stage, state_dict=state_dict)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(stage)
        _write_khead(model, stage)
        (stage / META_NAME).write_text(meta_json(model.meta), encoding="utf-8")

    replace_files(folder, write, last=META_NAME)


def save_khead(model: FluidModel, folder: str | Path, extras: dict[str, str] | None = None) -> None:
    """Rewrite only the K-head and `fluid.json` (after calibration), together with the text files `extras` (name ->
    content: the calibration report)."""
    def write(stage: Path) -> None:
        _write_khead(model, stage)
        for name, text in (extras or {}).items():
            (stage / name).write_text(text, encoding="utf-8")
        (stage / META_NAME).write_text(meta_json(model.meta), encoding="utf-8")

    replace_files(folder, write, last=META_NAME)


def _write_khead(model: FluidModel, stage: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.khead.state_dict().items()}, stage / KHEAD_NAME)


# --------------------------------------------------------------------------------------------- loading


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    merge: bool = False,
    attn_implementation: str | None = None,
) -> FluidModel:
    """Load a FLUID folder. `merge` (for decoding) folds an adapter that acts on every row into the weights (the
    same function, one matmul per layer fewer) and fixes a draft-only adapter for decoding (its gate still
    decides per row; see `DraftGate.freeze_for_decoding`). Without `merge` the weights are as trained."""
    folder = Path(folder)
    meta = read_meta(folder)
    check_files(folder, meta)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    hf_logging.disable_progress_bar()  # loading bars would interleave with the commands' own output
    tokenizer = load_tokenizer(str(folder), trust_remote_code=meta.trust_remote_code, remedy=REMEDY)
    common: dict[str, Any] = {"dtype": dtype, "trust_remote_code": meta.trust_remote_code,
                              "attn_implementation": attn_implementation}
    mask_in_base = False  # full weights: no base model to keep a logit for
    if meta.weights == "full":
        backbone = load_causal_lm(str(folder), **common, remedy=REMEDY)
    else:
        try:
            base = load_causal_lm(meta.base_model, **common)
        except FluidError as e:
            raise FluidError(f"{e} — the base model path comes from {folder / META_NAME} (base_model); if the base "
                             "moved, edit that field") from None
        mask_in_base = meta.mask_token_id < embedding_rows(base)
        if embedding_rows(base) < meta.vocab_size:  # the added rows' values come from the adapter just below
            base.resize_token_embeddings(meta.vocab_size, mean_resizing=False)
        backbone = load_lora(base, folder)
        if merge and meta.lora_scope == "all":
            backbone = backbone.merge_and_unload()
    rows = embedding_rows(backbone)
    if rows < meta.vocab_size:
        raise FluidError(f"{folder}: the model has {rows} embedding rows but {META_NAME} records a vocabulary of "
                         f"{meta.vocab_size}; the folder does not match its base model ({REMEDY})")
    khead = _read_khead(folder, hidden_size_of(backbone.config), meta.max_k)
    model = FluidModel(backbone, khead.to(dtype=dtype), meta, tokenizer).to(device).eval()
    model.mask_in_base = mask_in_base
    if merge and model.gate is not None:
        model.gate.freeze_for_decoding()
    return model


def check_files(folder: Path, meta: FluidMeta) -> None:
    """The files `fluid.json` says the folder holds are there and whole (weights, adapter, K-head, JSON configs),
    before anything heavy is loaded; a missing or damaged one is named with the fix."""
    needed = ["config.json", "model.safetensors"] if meta.weights == "full" else \
        ["adapter_config.json", "adapter_model.safetensors"]
    for name in [*needed, KHEAD_NAME]:
        if not (folder / name).is_file() and not (name == "model.safetensors" and _sharded(folder)):
            raise FluidError(f"{folder / name}: missing ({REMEDY})")
    check_weight_files(folder, REMEDY)


def _sharded(folder: Path) -> bool:
    """Large full-weight models are saved in shards (`model-00001-of-00004.safetensors` and an index)."""
    return (folder / "model.safetensors.index.json").is_file()


def _read_khead(folder: Path, hidden_size: int, max_k: int) -> KHead:
    path = folder / KHEAD_NAME  # present: `check_files` ran first
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise FluidError(f"{path}: unreadable K-head weights ({first_line(e)}; {REMEDY})") from None
    head = KHead(hidden_size, max_k)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise FluidError(f"{path}: K-head weights of another shape (for hidden size {hidden_size} and K={max_k} "
                         f"the head has {len(expected)} tensors such as net.2.weight {expected['net.2.weight']}; "
                         f"found {found.get('net.2.weight', 'none')}); {REMEDY}")
    head.load_state_dict(state)
    return head


def load_for_inference(
    path: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    mask_token: str | None = None,
    max_k: int | None = None,
    trust_remote_code: bool = False,
) -> FluidModel:
    """A FLUID folder, or a plain transformers causal-LM folder wrapped with `FluidModel.from_plain` (no K-head
    training, an existing token as the mask). The one loader of generate, bench, eval and the lm-eval adapter."""
    folder = Path(path)
    if is_fluid_folder(folder):
        trained = read_meta(folder).mask_token
        if mask_token is not None and mask_token != trained:  # its drafts were trained on its own mask token
            raise FluidError(f"mask_token {mask_token!r}: {folder} is a FLUID model, which drafts with the mask token "
                             f"it was trained with ({trained!r}); another one is chosen only for a plain model")
        return load_model(folder, device=device, dtype=dtype, merge=True)
    if not (folder / "config.json").is_file():
        read_meta(folder)  # the standard "not found" / "not a FLUID model folder" error
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    hf_logging.disable_progress_bar()
    lm = load_causal_lm(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    return FluidModel.from_plain(lm.to(device).eval(), tokenizer, mask_token=mask_token, max_k=max_k,
                                 source=str(folder))
