"""Typed recipes: a TOML file -> validated dataclasses, one table per concern.

A recipe is a TOML file with the tables `[model]`, `[data]`, `[fluid]`, `[lora]`, `[train]`, `[khead]`,
`[generate]`, `[eval]` and `[launch]`; every table and key is optional and has a default. Loading checks every
key against the dataclasses below: an unknown key or a value of the wrong type is a `FluidError` that names the
file, the line and the key path, e.g. ``recipe.toml:7: [train] lr: expected a float, got 'fast'``.

Dotted overrides from the command line are applied before validation::

    >>> cfg = load_recipe_text('[train]\\nlr = 1e-4\\n', overrides=["train.max_steps=20", "lora.enabled=false"])
    >>> cfg.train.lr, cfg.train.max_steps, cfg.lora.enabled
    (0.0001, 20, False)

Relative paths in a recipe are relative to the current working folder, as for any command-line tool.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fluid_cli.errors import FluidError
from fluid_cli.io import write_text_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

RESOLVED_CONFIG_NAME = "fluid-config.toml"

# Choice lists, defined once: the schema, the command line and the code that acts on them all read these.
HORIZONS = ("auto", "cost", "khead", "fixed", "entropy")  # decoding horizon policies (fluid_cli.decode)
DECODERS = ("fluid", "ar")  # FLUID decoding, or plain greedy decoding through the same loop
EVAL_DECODERS = (*DECODERS, "both")  # `fluid eval` runs one, or both side by side


# --------------------------------------------------------------------------------------------- tables


@dataclass
class ScratchModelConfig:
    """A model initialised from random weights instead of a pretrained checkpoint (e.g. for the demo)."""

    architecture: str = "llama"  # a transformers model_type: llama, qwen2, qwen3, mistral, ...
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    # Built at run time: "char" = one token per printable character; "bpe" = a byte-level BPE of
    # `tokenizer_vocab_size` tokens that `prepare-data` trains on the data (digits stay single tokens).
    tokenizer: Literal["char", "bpe"] = "char"
    tokenizer_vocab_size: int = 1024


@dataclass
class ModelConfig:
    path: str | None = None  # local folder or hub id of a pretrained causal LM
    scratch: ScratchModelConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    trust_remote_code: bool = False
    tokenizer: str | None = None  # defaults to `path`


@dataclass
class DataSource:
    # file, glob, save_to_disk folder, hub dataset name, "synthetic:arithmetic", or "self": prompts sampled from the
    # model itself (num_samples prefixes from BOS of prefix_tokens = [min, max] tokens), for [data.regenerate]
    path: str
    # None = "messages" for data, "prompt_response" (question -> prompt, answer -> response) for synthetic sources
    format: Literal["messages", "sharegpt", "alpaca", "prompt_response", "text"] | None = None
    columns: dict[str, str] = field(default_factory=dict)  # role -> column name, e.g. {prompt="question"}
    split: str = "train"
    weight: float | None = None  # relative share of the mixture
    num_samples: int | None = None  # absolute number of rows (synthetic: how many to generate)
    # Single-turn formats: Python format strings over the row's columns plus {prompt}/{response}, giving the user
    # and assistant text. None = "{prompt}" / "{response}"; for synthetic sources with template = "none",
    # lm-eval's GSM8K layout "Question: {question}\nAnswer:" / " {answer}".
    prompt_format: str | None = None
    response_format: str | None = None
    prefix_tokens: list[int] | None = None  # path = "self": [min, max] length of the sampled prompt prefixes


@dataclass
class RegenerateConfig:
    """`[data.regenerate]`: self-distillation. Every row's trained part (the response, or the last assistant turn) is
    replaced by a model's own continuation of the row's prompt, its token ids kept exactly as generated."""

    model: str | None = None  # the model that continues the prompts (default: [model] path)
    mode: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0  # mode = "sample"
    max_new_tokens: int = 256
    batch_size: int = 32  # prompts generated together (left-padded, with the KV cache)
    num_proc: int = 1  # processes generating at once (CPU); each loads the model
    seed: int = 0  # sampling, and the prompts of a "self" source
    backend: Literal["transformers"] = "transformers"  # generate() of transformers
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    output_dir: str = "runs/data"
    template: Literal["auto", "none"] = "auto"  # "auto" = the tokenizer's chat template, "none" = raw text + EOS
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    cutoff_len: int = 1024
    validation: float = 0.0  # fraction (< 1) or count (>= 1) of rows held out
    seed: int = 0
    num_proc: int = 1
    skip_bad_rows: bool = False
    regenerate: RegenerateConfig | None = None  # self-distillation of the trained parts (see RegenerateConfig)


@dataclass
class FluidConfig:
    mask_token: str = "<|mask|>"
    add_mask_token: bool = True  # add `mask_token` as a new special token when the vocabulary lacks it
    max_k: int = 16  # K, the largest horizon
    p_anchor: float = 0.5
    fixed_k: bool = False  # k = K for every block instead of k ~ U{1..K}
    reveal: bool = True  # partial reveal of block slots (METHOD 1.3)
    noise: float = 0.1  # probability that a revealed slot holds a random token instead
    ar_weight: float = 1.0
    diff_weight: float = 1.0


@dataclass
class LoraSection:
    enabled: bool = True  # false = full fine-tuning
    # draft: the LoRA deltas (and the mask row) act only on block rows, main rows run the frozen base weights, so
    # verified decoding equals the original model's greedy decoding; all: on every row (the original method's
    # joint training; verified decoding then equals the adapted model's greedy decoding)
    scope: Literal["draft", "all"] = "draft"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainConfig:
    output_dir: str = "runs/stage1"
    dataset: str | None = None  # defaults to [data] output_dir
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    max_expanded_len: int | None = None  # cap on main tokens + mask slots per example
    save_steps: int = 500  # checkpoint (weights, optimizer, scheduler, RNG, data position) every N steps
    save_total_limit: int = 2  # newest checkpoints kept (0 = keep all)
    log_steps: int = 10  # metrics.jsonl gets the mean over each window of N steps
    tensorboard: bool = False  # also log to <output_dir>/tensorboard (needs the tensorboard package)


@dataclass
class KHeadConfig:
    model_dir: str | None = None  # defaults to [train] output_dir
    dataset: str | None = None  # defaults to [data] output_dir
    # loss-curve: regress per-slot losses, the horizon rule applied at decode time (so --tau works at generate
    # time); gaussian: the paper's classifier over horizons for one tau
    objective: Literal["loss-curve", "gaussian"] = "loss-curve"
    tau: float = 2.8
    sigma: float = 1.5
    steps: int = 2000
    lr: float = 2e-4
    batch_size: int = 256
    cutoff_len: int = 512
    max_examples: int | None = None
    holdout: float = 0.1  # fraction of the examples whose pairs score the head instead of training it
    seed: int = 0
    collect_batch_size: int = 8  # examples per frozen-backbone forward in the collection pass
    max_memory_mb: int = 2048  # (hidden, losses) pairs beyond this spill to a memory-mapped temporary file


@dataclass
class GenerateConfig:
    model_dir: str | None = None  # defaults to [train] output_dir
    # cost: expected tokens per unit of time (draft confidences, measured forward costs); khead: the K-head's K*
    # at tau; fixed: always max_k; entropy: from the first draft's entropy; auto: cost with verification, else
    # khead when the head is calibrated, else entropy
    horizon: Literal[HORIZONS] = "auto"
    tau: float | None = None  # khead: defaults to the model's calibration tau; entropy: 2.8
    threshold: float | None = None  # fill a draft slot early above this probability; default 0 verified, 0.9 not
    max_k: int | None = None  # defaults to the model's K
    min_k: int = 1
    verify: bool = True
    max_new_tokens: int = 256
    batch_size: int = 1  # prompts decoded together (a finished one makes room for the next)
    compile: bool = False  # fixed-shape decode steps through torch.compile (CUDA graphs on a GPU)
    chat_template: bool = True  # ignored (with a notice) when the tokenizer has none
    stop: list[str] = field(default_factory=list)  # stop strings, kept in the output as HF generate does
    mask_token: str | None = None  # plain (non-FLUID) models only; defaults to the tokenizer's unk, then pad token
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bfloat16 on GPU, float32 on CPU


@dataclass
class EvalConfig:
    model_dir: str | None = None  # defaults to [train] output_dir; decoding settings come from [generate]
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None
    decoder: Literal[EVAL_DECODERS] = "fluid"
    data_dir: str | None = None  # local benchmark files laid out like ../shared/data (else env FLUID_DATA_DIR)
    output_dir: str = "runs/eval"
    apply_chat_template: bool = False
    batch_size: int = 8  # log-likelihood requests per forward
    max_gen_toks: int | None = None  # caps every generation task's own limit (quick runs)
    allow_code_execution: bool = False  # HumanEval runs the generated programs (in a subprocess, with a timeout)
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # "auto": bfloat16 on GPU, float32 on CPU


@dataclass
class LaunchConfig:
    num_processes: int = 1  # > 1: `fluid train-stage1` re-executes itself under `accelerate launch`
    accelerate_config: str | None = None  # an accelerate config file (DDP, FSDP, DeepSpeed); also re-executes
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 on a GPU that has it, else fp32
    main_process_port: int | None = None  # rendezvous port for several processes (None = accelerate's 29500)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fluid: FluidConfig = field(default_factory=FluidConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    khead: KHeadConfig = field(default_factory=KHeadConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str | None = field(default=None, metadata={"internal": True})  # the recipe file, if any

    def save(self, folder: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
        """Write the resolved recipe as `name` (`fluid-config.toml`) into `folder` (atomically); return its path."""
        path = Path(folder) / name
        write_text_atomic(path, dump_recipe(self))
        return path


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a TOML recipe file, applying `--set key.path=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FluidError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    return load_recipe_text(text, overrides, file=str(path))


def load_recipe_text(text: str, overrides: list[str] | None = None, file: str = "<recipe>") -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FluidError(f"{file}: invalid TOML: {e}") from None
    for item in overrides or []:
        _apply_override(raw, item)
    recipe = build_typed(Recipe, raw, (), _Where(file, text))
    recipe.source = None if file == "<recipe>" else file
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML (None values are left out: TOML has no null)."""
    return tomli_w.dumps(_strip_none(_asdict(recipe)))


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _asdict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("internal")
        }
    if isinstance(obj, list):
        return [_asdict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _asdict(v) for k, v in obj.items()}
    return obj


def _strip_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_strip_none(v) for v in obj]
    return obj


def _apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as TOML, else taken as a plain string."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise FluidError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FluidError(f"--set {item!r}: {part!r} is not a table")
        node = child
    node[parts[-1]] = parsed


@dataclass
class _Where:
    """Where a key sits, for error messages: the file name and, when it can be found, the line."""

    file: str
    text: str

    def line_of(self, keypath: tuple[str | int, ...]) -> int | None:
        # tomllib keeps no positions; find the key's line inside its table header's section instead.
        names = [k for k in keypath if isinstance(k, str)]
        if not names:
            return None
        key, table = names[-1], names[:-1]
        in_table = not table
        key_re = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
        dotted_re = re.compile(rf"^\s*{re.escape('.'.join(names))}\s*=")
        for n, line in enumerate(self.text.splitlines(), start=1):
            header = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if header:
                if header.group(1).split(".") == names:
                    return n
                in_table = header.group(1).split(".") == table
                continue
            if (in_table and key_re.match(line)) or dotted_re.match(line):
                return n
        return None

    def error(self, keypath: tuple[str | int, ...], message: str) -> FluidError:
        line = self.line_of(keypath)
        loc = f"{self.file}:{line}" if line else self.file
        return FluidError(f"{loc}: {_format_keypath(keypath)}: {message}")


def _format_keypath(keypath: tuple[str | int, ...]) -> str:
    if not keypath:
        return "recipe"
    head, *rest = keypath
    out = f"[{head}]"
    for part in rest:
        out += f"[{part}]" if isinstance(part, int) else f" {part}" if out.endswith("]") else f".{part}"
    return out


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "nothing"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a float", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def build_typed(tp: Any, value: Any, keypath: tuple[str | int, ...], where: Any) -> Any:
    """Check `value` against the type annotation `tp`, building dataclasses from tables.

    `where.error(keypath, message)` makes the `FluidError` for a mismatch (a recipe names file and line; other
    typed files, such as a model folder's `fluid.json`, say where in their own way)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise where.error(keypath, f"expected a table, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
        for key in value:
            if key not in known:
                choices = ", ".join(known)
                raise where.error(keypath + (key,), f"unknown key (known keys here: {choices})")
        kwargs = {k: build_typed(hints[k], v, keypath + (k,), where) for k, v in value.items()}
        for name, f in known.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise where.error(keypath + (name,), "required key is missing")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        tables = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(tables) == 1:  # a table given for an optional table: its own errors
            return build_typed(tables[0], value, keypath, where)
        for arg in args:
            try:
                return build_typed(arg, value, keypath, where)
            except FluidError:
                continue
        raise where.error(keypath, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise where.error(keypath, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise where.error(keypath, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [build_typed(item_tp, v, keypath + (i,), where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(keypath, f"expected a table, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {k: build_typed(val_tp, v, keypath + (k,), where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):  # only JSON has a null (TOML does not)
        if value is None:
            return None
        raise where.error(keypath, "expected nothing")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise where.error(keypath, f"expected {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise where.error(keypath, f"expected {_type_name(tp)}, got {value!r}")
    return value
