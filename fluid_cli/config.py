"""Typed recipes: a TOML file -> validated dataclasses, one table per concern.

A recipe is a TOML file with the tables `[model]`, `[data]`, `[fluid]`, `[lora]`, `[train]`, `[khead]`, `[generate]`,
`[eval]`, `[bench]`, `[serve]` and `[launch]`; every table and key is optional and has a default. Loading checks every
key against the dataclasses below: an unknown key or a value of the wrong type is a `FluidError` that names the file,
the line and the key path, e.g. ``recipe.toml:7: [train] lr: expected a float, got 'fast'``. Then every value is
checked against its range and the recipe for consistency (`validate`), in the same format: ``recipe.toml:7: [train]
lr: must be greater than 0, got 0.0``. A value that came from `--set` (or from a command's flag) is named by that
argument instead of a recipe line: ``--set train.lr=fast: [train] lr: expected a float, got 'fast'``.

Dotted overrides from the command line are applied before validation::

    >>> cfg = load_recipe_text('[train]\\nlr = 1e-4\\n', overrides=["train.max_steps=20", "lora.enabled=false"])
    >>> cfg.train.lr, cfg.train.max_steps, cfg.lora.enabled
    (0.0001, 20, False)

Relative paths in a recipe are relative to the current working folder, as for any command-line tool.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fluid_cli import llamafactory
from fluid_cli.errors import FluidError
from fluid_cli.io import read_text, write_text_atomic

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

RESOLVED_CONFIG_NAME = "fluid-config.toml"

# Choice lists, defined once: the schema, the command line and the code that acts on them all read these.
HORIZONS = ("auto", "cost", "khead", "fixed", "entropy")  # decoding horizon policies (fluid_cli.decode)
DECODERS = ("fluid", "ar")  # FLUID decoding, or plain greedy decoding through the same loop
EVAL_DECODERS = (*DECODERS, "both")  # `fluid eval` runs one, or both side by side
# `fluid bench decode`: transformers' greedy generate (dynamic, static cache), prompt-lookup decoding, assisted
# generation, this package's greedy loop, FLUID
BENCH_DECODERS = ("hf", "hf-static", "prompt-lookup", "assisted", "ar", "fluid")
LR_SCHEDULERS = ("cosine", "linear", "constant")  # [train] lr_scheduler, after the warmup (fluid_cli.train)


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
    path: str | None = None
    # or: a dataset registered in [data] dataset_dir's dataset_info.json (LLaMA-Factory's; fluid_cli.dataset_info)
    dataset: str | None = None
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
    # path = "self": the sampling temperature of the prefixes (above 1: more varied prompts than the model's most
    # typical openings, e.g. names and topics it rarely starts with)
    prefix_temperature: float | None = None


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
    dataset_dir: str | None = None  # the folder of LLaMA-Factory's dataset_info.json ([[data.sources]] dataset = ...)
    max_samples: int | None = None  # only the first N rows of each source (after num_samples), as LLaMA-Factory
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
    lr_scheduler: Literal[LR_SCHEDULERS] = "cosine"  # the learning rate after the warmup: to 0, or constant
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
    # Sampling (verified drafts accepted by speculative sampling: every token follows the model's own warped
    # distribution). None or 0: greedy decoding; `fluid eval` then follows each task's own generation settings.
    temperature: float | None = None
    top_p: float = 1.0  # keep the most likely tokens whose mass reaches top_p (1: all)
    top_k: int = 0  # keep the top_k most likely tokens (0: all)
    seed: int | None = None  # prompt i of a run samples with seed + i (None: a fresh seed each, reported)
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
class BenchConfig:
    """`fluid bench decode`: which prompts, which decoders, which batch sizes (decoding settings: [generate])."""

    prompt_file: str | None = None  # one prompt per line, or JSONL (as `fluid generate --prompt-file`)
    limit: int | None = None  # only the first N prompts
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decoders: list[Literal[BENCH_DECODERS]] = field(default_factory=lambda: ["hf", "prompt-lookup", "ar", "fluid"])
    draft_model: str | None = None  # assisted generation's small model (same tokenizer)
    lookup_tokens: int = 8  # prompt_lookup_num_tokens of prompt-lookup decoding
    output: str | None = None  # the JSON report


@dataclass
class ServeConfig:
    """`fluid serve`: the OpenAI-compatible server (the model and decoding settings: [generate], whose
    max_new_tokens is a request's default max_tokens; requests are greedy unless they ask otherwise)."""

    host: str = "127.0.0.1"  # 0.0.0.0 serves every interface
    port: int = 8000
    model_name: str | None = None  # the `model` clients name; default: the model folder's name
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>` (None: no key needed)
    decoder: Literal[DECODERS] = "fluid"  # ar: greedy decoding one token per forward (a baseline)
    max_batch_size: int = 16  # requests decoded together (rows of the KV cache)
    max_queue: int = 64  # requests waiting for a row; one more is refused with 429
    max_len: int | None = None  # positions per row (prompt + completion); default: the model's context
    drain_s: float = 30.0  # on SIGINT/SIGTERM, seconds in-flight requests may take to finish before cancelling


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
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: str | None = field(default=None, metadata={"internal": True})  # the recipe file, if any

    def save(self, folder: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
        """Write the resolved recipe as `name` (`fluid-config.toml`) into `folder` (atomically); return its path."""
        path = Path(folder) / name
        write_text_atomic(path, dump_recipe(self))
        return path


def path_source(recipe: Recipe, *keys: str) -> tuple[str, str]:
    """The value of the first of `keys` (dotted: "khead.model_dir", "train.output_dir") that is set, and how a
    message names where it came from, so that a path the user never wrote is never reported bare: the key, and
    whether it is that key's default and which keys before it are unset.

    >>> path_source(Recipe(), "khead.model_dir", "train.output_dir")
    ('runs/stage1', 'the default of [train] output_dir, as [khead] model_dir is not set')
    """
    for n, key in enumerate(keys):
        table, name = key.split(".")
        value = getattr(getattr(recipe, table), name)
        if value is not None or n == len(keys) - 1:
            break
    default = next(f.default for f in dataclasses.fields(getattr(recipe, table)) if f.name == name)
    how = ("the default of " if value == default else "") + f"[{table}] {name}"
    unset = [f"[{k.split('.')[0]}] {k.split('.')[1]}" for k in keys[:n]]
    return value, how + (f", as {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set" if unset else "")


# --------------------------------------------------------------------------------------------- loading


@dataclass
class Flag:
    """A command's flag that sets a recipe key (`--tau 2.8` sets `generate.tau`): applied after `--set`, its value
    taken as given, and named by `text` in errors."""

    key: str  # dotted key path, e.g. "generate.tau"
    value: Any
    text: str  # the flag as the user gave it, e.g. "--tau 2.8"


def load_recipe(path: str | Path, overrides: list[str] | None = None, flags: list[Flag] | None = None) -> Recipe:
    """Load and validate a TOML recipe file (or a LLaMA-Factory YAML config, `fluid_cli.llamafactory`), applying
    `--set key.path=value` overrides, then `flags`."""
    path = Path(path)
    if not path.is_file():
        raise FluidError(f"{path}: recipe file not found" if not path.is_dir() else
                         f"{path}: a folder, not a recipe file")
    if path.suffix.lower() in (".yaml", ".yml"):
        raw, origins = llamafactory.translate(read_text(path, "recipe"), str(path))
        # Lines of the YAML are named through `origins`; a TOML line search would find nothing in it.
        return _typed_recipe(raw, _Where(str(path), "", origins), overrides, flags)
    return load_recipe_text(read_text(path, "recipe"), overrides, file=str(path), flags=flags)


def load_recipe_text(text: str, overrides: list[str] | None = None, file: str = "<recipe>",
                     flags: list[Flag] | None = None) -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FluidError(f"{file}: invalid TOML: {e}") from None
    return _typed_recipe(raw, _Where(file, text), overrides, flags)


def _typed_recipe(raw: dict, where: _Where, overrides: list[str] | None, flags: list[Flag] | None) -> Recipe:
    """The raw tables of a recipe, with `overrides` and `flags` applied, typed and validated."""
    file = where.file
    for item in overrides or []:
        where.origins[_apply_override(raw, item)] = f"--set {item}"
    for flag in flags or []:
        where.origins[_set_key(raw, flag.key, flag.value, flag.text)] = flag.text
    recipe = build_typed(Recipe, raw, (), where)
    validate(recipe, where)
    recipe.source = None if file == "<recipe>" else file
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML (None values are left out: TOML has no null)."""
    return tomli_w.dumps(without_nulls(_asdict(recipe)))


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


def without_nulls(obj: Any) -> Any:
    """`obj` with every None-valued key of its dicts (at any depth) left out: TOML has no null, and a JSON row read
    through Arrow has every key of its file.

    >>> without_nulls({"a": 1, "b": None, "c": [{"d": None, "e": 2}]})
    {'a': 1, 'c': [{'e': 2}]}
    """
    if isinstance(obj, dict):
        return {k: without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [without_nulls(v) for v in obj]
    return obj


def _apply_override(raw: dict, item: str) -> tuple[str, ...]:
    """Apply one `a.b.c=value` override (the value parsed as TOML, else taken as a plain string); returns the key
    path it set."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise FluidError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return _set_key(raw, key, parsed, f"--set {item}")


def _set_key(raw: dict, key: str, value: Any, origin: str) -> tuple[str | int, ...]:
    """Set `key` (`table.key`, with `name[i]` for the i-th table of an array such as `data.sources[0].weight`)."""
    node: Any = raw
    path: list[str | int] = []
    parts = key.split(".")
    for n, part in enumerate(parts):
        name, index = _indexed(part, origin)
        last = n == len(parts) - 1
        path.append(name)
        if index is None:
            if last:
                node[name] = value
                break
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise FluidError(f"{origin}: {name!r} is not a table")
            continue
        entries = node.get(name)
        if not isinstance(entries, list) or not 0 <= index < len(entries):
            count = len(entries) if isinstance(entries, list) else 0
            raise FluidError(f"{origin}: {name}[{index}]: the recipe has {count} {name} entr{'y' if count == 1 else 'ies'}")
        path.append(index)
        if last:
            entries[index] = value
            break
        node = entries[index]
    return tuple(path)


def _indexed(part: str, origin: str) -> tuple[str, int | None]:
    """`sources[2]` -> ("sources", 2); `lr` -> ("lr", None)."""
    match = re.fullmatch(r"([^\[\]]+)(?:\[(\d+)\])?", part)
    if match is None:
        raise FluidError(f"{origin}: {part!r}: expected a key or key[index]")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


@dataclass
class _Where:
    """Where a key sits, for error messages: the file name and, when it can be found, the line; or the `--set`
    argument or flag that gave it its value (`origins`: key path -> argument)."""

    file: str
    text: str
    origins: dict[tuple[str | int, ...], str] = field(default_factory=dict)

    def line_of(self, keypath: tuple[str | int, ...]) -> int | None:
        # tomllib keeps no positions; find the key's line inside its table header's section instead. An index
        # into an array of tables ([[data.sources]]) picks that table's n-th header.
        names = [k for k in keypath if isinstance(k, str)]
        if not names:
            return None
        key, table = names[-1], names[:-1]
        index = next((k for k in keypath if isinstance(k, int)), 0)
        seen = 0  # headers of `table` met so far
        in_table = not table
        key_re = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
        dotted_re = re.compile(rf"^\s*{re.escape('.'.join(names))}\s*=")
        for n, line in enumerate(self.text.splitlines(), start=1):
            header = re.match(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if header:
                parts = header.group(1).split(".")
                if parts == names:
                    return n
                if parts == table:
                    seen += 1
                in_table = parts == table and seen == index + 1
                continue
            if (in_table and key_re.match(line)) or dotted_re.match(line):
                return n
        return None

    def origin(self, keypath: tuple[str | int, ...]) -> str | None:
        """The command-line argument that set `keypath` (or a table holding it), if one did."""
        return next((self.origins[keypath[:n]] for n in range(len(keypath), 0, -1) if keypath[:n] in self.origins),
                    None)

    def error(self, keypath: tuple[str | int, ...], message: str) -> FluidError:
        loc = self.origin(keypath)
        if loc is None:
            line = self.line_of(keypath)
            loc = f"{self.file}:{line}" if line else self.file
        return FluidError(f"{loc}: {format_keypath(keypath)}: {message}")


def format_keypath(keypath: tuple[str | int, ...]) -> str:
    """How the recipe spells a key: `[model.scratch] hidden_size`, `[data] sources[0] path`."""
    if not keypath:
        return "recipe"
    if len(keypath) > 1 and all(isinstance(k, str) for k in keypath):
        return f"[{'.'.join(keypath[:-1])}] {keypath[-1]}"
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


# --------------------------------------------------------------------------------------------- ranges and consistency

# The largest horizon a recipe may ask for: blocks of K mask slots grow a training sequence to about
# `cutoff_len * (1 + p_anchor * K)` positions, with a dense attention mask over them.
MAX_K = 128
# The attention mask of one training batch may take at most this much memory (bytes, estimated before any work).
MAX_MASK_BYTES = 32 << 30
# A source's rows, at most; synthetic rows are generated in memory, so they get a lower bound.
MAX_SAMPLES = 100_000_000
MAX_SYNTHETIC_SAMPLES = 1_000_000

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it (None: nothing)


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _at_least(low: float, hint: str = "") -> Check:
    return lambda v: None if v >= low else f"must be at least {_num(low)}, got {_num(v)}{hint}"


def _positive(hint: str = "") -> Check:
    return lambda v: None if v > 0 else f"must be greater than 0, got {_num(v)}{hint}"


def _between(low: float, high: float, *, open_low: bool = False, open_high: bool = False, hint: str = "") -> Check:
    def check(v: Any) -> str | None:
        ok = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        interval = f"{'(' if open_low else '['}{_num(low)}, {_num(high)}{')' if open_high else ']'}"
        return None if ok else f"must be in {interval}, got {_num(v)}{hint}"
    return check


def _not_empty(v: Any) -> str | None:
    return None if len(v) else "must not be empty (leave the key out for its default)"


DEVICE_NAME = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def device_error(name: str) -> str | None:
    """What is wrong with a device name, if anything: the one rule for the recipe's `device` keys and
    `fluid_cli.hf.resolve_device` (which also checks that the device is there).

    >>> device_error("cuda:1"), device_error("gpu")
    (None, "'gpu' is not a device: expected auto, cpu, cuda, cuda:N (the N-th GPU), mps or xpu")
    """
    if DEVICE_NAME.fullmatch(name):
        return None
    return f"{name!r} is not a device: expected auto, cpu, cuda, cuda:N (the N-th GPU), mps or xpu"


SEED = _between(0, 2**32 - 1, hint=" (a seed is a whole number from 0 to 2**32 - 1)")
K_RANGE = _between(1, MAX_K, hint=f" (the horizon: blocks of 1 to {MAX_K} mask slots)")

# Per table, per key: the range of a set value (None, "not set", is never checked). Checks that need a file, a
# dataset or a model live with the command that has them.
RULES: dict[type, dict[str, Check]] = {
    ScratchModelConfig: {
        "hidden_size": _at_least(1), "intermediate_size": _at_least(1), "num_hidden_layers": _at_least(1),
        "num_attention_heads": _at_least(1), "num_key_value_heads": _at_least(1),
        "max_position_embeddings": _at_least(2), "tokenizer_vocab_size": _at_least(1),
    },
    ModelConfig: {"path": _not_empty, "tokenizer": _not_empty},
    DataSource: {
        "path": _not_empty, "dataset": _not_empty, "weight": _positive(), "prefix_temperature": _positive(),
        "num_samples": _between(1, MAX_SAMPLES, hint=" (rows to take; ask for fewer)"),
    },
    RegenerateConfig: {
        "model": _not_empty, "temperature": _positive(), "max_new_tokens": _at_least(1), "batch_size": _at_least(1),
        "num_proc": _at_least(1), "seed": SEED,
    },
    DataConfig: {
        "output_dir": _not_empty, "cutoff_len": _at_least(1), "seed": SEED, "num_proc": _at_least(1),
        "dataset_dir": _not_empty, "max_samples": _at_least(1),
        "validation": _at_least(0, " (a fraction below 1, or a count of rows)"),
    },
    FluidConfig: {
        "mask_token": lambda v: None if v else "must not be empty (name a reserved token of the vocabulary, or a "
                                               "new one to add)",
        "max_k": K_RANGE,
        "p_anchor": _between(0, 1, open_low=True, hint=" (the probability that a response position anchors a "
                                                       "block; 0 would train no blocks)"),
        "noise": _between(0, 1), "ar_weight": _at_least(0), "diff_weight": _at_least(0),
    },
    LoraSection: {"r": _at_least(1), "alpha": _at_least(1), "dropout": _between(0, 1, open_high=True),
                  "target_modules": _not_empty},
    TrainConfig: {
        "output_dir": _not_empty, "dataset": _not_empty, "lr": _positive(" (e.g. 2e-4)"), "weight_decay": _at_least(0),
        "warmup_ratio": _between(0, 1, hint=" (the fraction of the steps spent warming up)"),
        "batch_size": _at_least(1), "grad_accum": _at_least(1), "max_steps": _at_least(1), "epochs": _positive(),
        "max_grad_norm": _positive(" (gradients are clipped to this norm)"), "seed": SEED,
        "max_expanded_len": _at_least(2), "save_steps": _at_least(1), "save_total_limit": _at_least(0),
        "log_steps": _at_least(1),
    },
    KHeadConfig: {
        "model_dir": _not_empty, "dataset": _not_empty, "tau": _positive(" (a number of nats, e.g. 2.8)"),
        "sigma": _positive(), "steps": _at_least(1), "lr": _positive(), "batch_size": _at_least(1),
        "cutoff_len": _at_least(2), "max_examples": _at_least(2),
        "holdout": _between(0, 1, open_low=True, open_high=True, hint=" (the fraction of examples held out)"),
        "seed": SEED, "collect_batch_size": _at_least(1), "max_memory_mb": _at_least(0),
    },
    GenerateConfig: {
        "model_dir": _not_empty, "tau": _positive(" (a number of nats, e.g. 2.8)"),
        "threshold": _between(0, 1, hint=" (a probability; 1 = never fill a slot early)"), "max_k": K_RANGE,
        "min_k": _at_least(1), "max_new_tokens": _at_least(1), "batch_size": _at_least(1),
        "temperature": _at_least(0, " (0 is greedy decoding)"),
        "top_p": _between(0, 1, open_low=True, hint=" (1 keeps every token)"),
        "top_k": _at_least(0, " (0 keeps every token)"), "seed": SEED,
    },
    EvalConfig: {
        "model_dir": _not_empty, "limit": _at_least(1, " (samples per task; leave it unset for all)"),
        "num_fewshot": _at_least(0), "output_dir": _not_empty, "batch_size": _at_least(1),
        "max_gen_toks": _at_least(1),
    },
    BenchConfig: {"prompt_file": _not_empty, "limit": _at_least(1, " (prompts; leave it unset for all)"),
                  "batch_sizes": lambda v: None if v and min(v) >= 1 else f"must be batch sizes of 1 or more, got {v}",
                  "decoders": _not_empty, "draft_model": _not_empty, "lookup_tokens": _at_least(1),
                  "output": _not_empty},
    ServeConfig: {"host": _not_empty, "port": _between(1, 65535), "model_name": _not_empty,
                  "api_key": _not_empty, "max_batch_size": _at_least(1), "max_queue": _at_least(0),
                  "max_len": _at_least(2), "drain_s": _at_least(0)},
    LaunchConfig: {"num_processes": _at_least(1), "main_process_port": _between(1, 65535)},
}
for _section in (RegenerateConfig, GenerateConfig, EvalConfig):  # every table with a `device` key
    RULES[_section]["device"] = device_error


def validate(recipe: Recipe, where: Any) -> None:
    """Check every value of a typed recipe against its range (`RULES`; every float must be finite), then the keys
    that must agree with each other. Errors name the key as `build_typed`'s do (`where.error`)."""
    # Lazily, ranges first: the consistency checks may divide by a value that the ranges require to be positive.
    for keypath, message in itertools.chain(_range_errors(recipe, ()), _consistency_errors(recipe)):
        raise where.error(keypath, message)


def _range_errors(obj: Any, keypath: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _range_errors(item, keypath + (i,))
        return
    if not dataclasses.is_dataclass(obj):
        return
    rules = RULES.get(type(obj), {})
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), keypath + (f.name,)
        if f.metadata.get("internal") or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            yield path, f"must be a finite number, got {value}"
        elif f.name in rules and (message := rules[f.name](value)):
            yield path, message
        else:
            yield from _range_errors(value, path)


def _consistency_errors(r: Recipe) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Keys that are each in range but contradict one another."""
    scratch = r.model.scratch
    if scratch is not None:
        if scratch.hidden_size % scratch.num_attention_heads:
            yield (("model", "scratch", "num_attention_heads"),
                   f"{scratch.num_attention_heads} heads do not divide hidden_size = {scratch.hidden_size}")
        elif scratch.num_attention_heads % scratch.num_key_value_heads:
            yield (("model", "scratch", "num_key_value_heads"),
                   f"{scratch.num_key_value_heads} do not divide num_attention_heads = {scratch.num_attention_heads}")
    for i, src in enumerate(r.data.sources):
        if (src.path is None) == (src.dataset is None):
            yield ("data", "sources", i), "set path (a file, folder or hub dataset) or dataset (a registered name)"
        elif src.dataset is not None and r.data.dataset_dir is None:
            yield ("data", "sources", i, "dataset"), "needs [data] dataset_dir, the folder of dataset_info.json"
        elif (src.path or "").startswith("synthetic:") and (src.num_samples or 0) > MAX_SYNTHETIC_SAMPLES:
            yield (("data", "sources", i, "num_samples"),
                   (f"{src.num_samples:,} synthetic rows are more than the {MAX_SYNTHETIC_SAMPLES:,} generated in "
                    "memory at most; ask for fewer"))
        yield from _source_errors(src, ("data", "sources", i), r.data.cutoff_len)
    if r.data.validation >= 1 and r.data.validation != int(r.data.validation):
        yield ("data", "validation"), f"a count (>= 1) must be whole, got {r.data.validation}"
    f = r.fluid
    if f.ar_weight == 0 and f.diff_weight == 0:
        yield ("fluid", "diff_weight"), "ar_weight and diff_weight are both 0: nothing would be trained"
    g = r.generate
    if g.max_k is not None and g.min_k > g.max_k:
        yield ("generate", "min_k"), f"{g.min_k} is above max_k = {g.max_k}"
    if g.temperature and not g.verify:
        yield (("generate", "verify"),
               f"false with temperature = {g.temperature:g}: sampling needs verification (unverified drafts do not "
               "follow the model's distribution)")
    if g.temperature and g.threshold:
        yield (("generate", "threshold"),
               f"{g.threshold:g} with temperature = {g.temperature:g}: sampling takes every draft slot from the first "
               "draft (threshold 0); an early fill would bias the output")
    for key, value, unset in (("top_p", g.top_p, 1.0), ("top_k", g.top_k, 0)):
        if not g.temperature and value != unset:  # greedy decoding ignores them: say so, not decode greedily
            yield (("generate", key), f"{value:g} without a temperature: greedy decoding does not use {key}; set "
                   "temperature above 0 (--temperature) to sample with it")
    if r.train.max_expanded_len is not None and r.train.max_expanded_len <= f.max_k:
        yield (("train", "max_expanded_len"),
               f"{r.train.max_expanded_len} leaves no room for a block of max_k = {f.max_k} after the tokens")
    yield from _mask_memory_errors(r)


# The path of a source whose prompts are sampled from the model itself ([data.regenerate] continues them).
SELF_SOURCE = "self"
SELF_ONLY_KEYS = ("prefix_tokens", "prefix_temperature")  # how a "self" source samples its prompts
TEXT_ONLY_KEYS = ("format", "columns", "prompt_format", "response_format")  # how rows of text become prompts


def _source_errors(src: DataSource, at: tuple[str | int, ...], cutoff_len: int
                   ) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """A source's keys must be ones its kind reads: sampled prompts have no rows to format, rows no prefixes."""
    if src.path != SELF_SOURCE:
        rows = repr(src.path) if src.path is not None else f"the registered dataset {src.dataset!r}"
        for key in SELF_ONLY_KEYS:
            if getattr(src, key) is not None:
                yield at + (key,), (f"applies to prompts sampled from the model (path = \"{SELF_SOURCE}\"), "
                                    f"not {rows}")
        return
    for key in TEXT_ONLY_KEYS:
        if getattr(src, key):
            yield at + (key,), (f"a \"{SELF_SOURCE}\" source samples its prompts from the model: it has no rows to "
                                "format; remove the key")
    lengths = src.prefix_tokens
    if lengths is not None and not (len(lengths) == 2 and 1 <= lengths[0] <= lengths[1]):
        yield at + ("prefix_tokens",), f"expected [min, max] with 1 <= min <= max, got {lengths}"
    elif lengths is not None and lengths[1] >= cutoff_len:
        yield at + ("prefix_tokens",), (f"prefixes of up to {lengths[1]} tokens leave no room for a continuation "
                                        f"within [data] cutoff_len = {cutoff_len}; keep max below it")


def _mask_memory_errors(r: Recipe) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Refuse a training batch whose dense attention mask alone would not fit any machine (an estimate: every
    anchor drawn with probability p_anchor opens a block of up to max_k slots)."""
    f, t = r.fluid, r.train
    length = r.data.cutoff_len * (1 + f.p_anchor * f.max_k)
    if t.max_expanded_len is not None:
        length = min(length, t.max_expanded_len)
    mask_bytes = t.batch_size * length**2 * 4  # fp32 additive mask [batch, 1, length, length]
    if mask_bytes > MAX_MASK_BYTES:
        yield (("fluid", "max_k"),
               (f"{f.max_k} makes a training sequence of up to {r.data.cutoff_len} tokens about {length:,.0f} "
                f"positions long (p_anchor = {f.p_anchor}), and the attention mask of a batch of {t.batch_size} "
                f"about {mask_bytes / 2**30:,.0f} GiB; lower max_k, p_anchor, [data] cutoff_len or [train] "
                "batch_size, or cap the length with [train] max_expanded_len"))
