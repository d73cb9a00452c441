"""LLaMA-Factory training configs (YAML) as fluid recipes.

`fluid_cli.config.load_recipe` reads a `.yaml`/`.yml` recipe through `translate`, which gives the same raw tables a
TOML recipe would; typed checks, `--set` overrides and error messages then work as for TOML, an error naming the
YAML line and key that set the value (``train.yaml:9: learning_rate: [train] lr: must be greater than 0, got -1.0``).

Each LLaMA-Factory key becomes fluid's by `KEYS` (LLaMA-Factory's own default when the key is absent, so the
recipe trains as LLaMA-Factory would have; `None`: fluid's default). The README's "Coming from LLaMA-Factory"
shows the same table. More:

- `dataset` (names, comma-separated or a list) + `dataset_dir` (default `data`): `[[data.sources]] dataset = NAME`
  for each, read from `<dataset_dir>/dataset_info.json` (`fluid_cli.dataset_info`).
- `template`: the tokenizer's own chat template (`[data] template = "auto"`; `empty`: raw text, "none"; a
  `*_nothink` template also passes `enable_thinking = false` to it).
- `finetuning_type`: lora (default) or full (`[lora] enabled = false`); `lora_alpha` defaults to 2 x lora_rank;
  `lora_target` `all` is "all-linear", else the comma-separated module names.
- `lr_scheduler_type`: cosine, linear (default) or constant_with_warmup; constant is fluid's constant with no
  warmup (as transformers' constant schedule).
- `bf16`/`fp16`: `[launch] mixed_precision` (neither: "no", full precision, as LLaMA-Factory).
- gradient checkpointing is on unless `disable_gradient_checkpointing` (LLaMA-Factory's default).
- `deepspeed` (a DeepSpeed JSON): an accelerate config `<config>.accelerate.yaml` written beside the YAML, whose
  `deepspeed_config_file` is that JSON; accelerate reads it and fills its "auto" values but the micro-batch size.
- `output_dir`: `[train] output_dir`; the prepared data goes beside it, to `<output_dir>-data`.

FLUID's own settings (`[fluid]`, `[lora] scope`, `[khead]`, ...) keep fluid's defaults. Keys that change nothing
for fluid (`IGNORED`) are listed in one notice; keys that would train differently from what fluid does
(`REFUSED`) are errors, as is any key fluid does not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from fluid_cli.errors import FluidError
from fluid_cli.io import write_text_atomic

# LLaMA-Factory key -> (fluid keys it sets, LLaMA-Factory's default when absent; None: leave fluid's).
KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "model_name_or_path": (("model.path",), None),
    "trust_remote_code": (("model.trust_remote_code",), None),
    "cutoff_len": (("data.cutoff_len",), 2048),
    "max_samples": (("data.max_samples",), None),
    "val_size": (("data.validation",), 0.0),
    "preprocessing_num_workers": (("data.num_proc",), None),
    "output_dir": (("train.output_dir",), None),
    "lora_rank": (("lora.r",), 8),
    "lora_dropout": (("lora.dropout",), 0.0),
    "learning_rate": (("train.lr",), 5e-5),
    "num_train_epochs": (("train.epochs",), 3.0),
    "per_device_train_batch_size": (("train.batch_size",), 8),
    "gradient_accumulation_steps": (("train.grad_accum",), 1),
    "warmup_ratio": (("train.warmup_ratio",), 0.0),
    "weight_decay": (("train.weight_decay",), 0.0),
    "max_grad_norm": (("train.max_grad_norm",), 1.0),
    "save_steps": (("train.save_steps",), 500),
    "save_total_limit": (("train.save_total_limit",), None),
    "logging_steps": (("train.log_steps",), 500),
    "seed": (("train.seed", "data.seed"), 42),
}
# Keys whose values `translate` works out itself (see the module's docstring).
SPECIAL = ("dataset", "dataset_dir", "template", "enable_thinking", "finetuning_type", "lora_alpha", "lora_target",
           "max_steps", "lr_scheduler_type", "bf16", "fp16", "gradient_checkpointing",
           "disable_gradient_checkpointing", "deepspeed", "stage", "do_train")
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant_with_warmup": "constant", "constant": "constant"}
# Keys that change nothing in what fluid trains (logging, evaluation, caching, speed-ups fluid does its own way).
IGNORED = frozenset({
    "report_to", "plot_loss", "ddp_timeout", "overwrite_output_dir", "overwrite_cache", "dataloader_num_workers",
    "logging_dir", "run_name", "do_eval", "do_predict", "eval_strategy", "evaluation_strategy", "eval_steps",
    "per_device_eval_batch_size", "eval_dataset", "save_strategy", "save_only_model", "logging_strategy",
    "logging_first_step", "include_num_input_tokens_seen", "include_tokens_per_second", "disable_tqdm",
    "preprocessing_batch_size", "ddp_find_unused_parameters", "cache_dir", "flash_attn", "enable_liger_kernel",
    "use_unsloth_gc", "use_fast_tokenizer", "print_param_status", "push_to_hub", "hub_model_id", "hf_hub_token",
    "data_shared_file_system", "compute_accuracy", "predict_with_generate", "upcast_layernorm",
    "dataloader_pin_memory", "media_dir", "use_reentrant_gc", "gradient_checkpointing_kwargs", "double_quantization",
})
# So are the settings of other stages (DPO, KTO, PPO, reward models), of options whose switch is off or refused
# (freeze, OFT, PiSSA, LoRA+, GaLore, APOLLO, BAdam, the ASFT/EAFT losses), of media (multimodal datasets are
# refused themselves), of Ray and of SwanLab.
IGNORED_PREFIXES = ("pref_", "dpo_", "kto_", "simpo_", "ppo_", "ref_model", "reward_model", "ld_alpha", "freeze_",
                    "oft_", "pissa_", "loraplus_", "galore_", "apollo_", "badam_", "asft_", "eaft_", "image_",
                    "video_", "audio_", "ray_", "swanlab_", "eval_")
# Keys that would change the training in ways fluid does not support -> (the values that change nothing, why).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "packing": ((False, None), "fluid trains one example per row"),
    "neat_packing": ((False,), "fluid trains one example per row"),
    "train_on_prompt": ((False,), "fluid trains the assistant turns only"),
    "mask_history": ((False,), "fluid trains every assistant turn"),
    "use_dora": ((False,), "fluid's adapter is plain LoRA"),
    "use_rslora": ((False,), "fluid's adapter is plain LoRA"),
    "pissa_init": ((False,), "fluid's adapter is plain LoRA"),
    "loraplus_lr_ratio": ((None,), "fluid's adapter is plain LoRA"),
    "additional_target": ((None,), "fluid trains LoRA on lora_target only"),
    "create_new_adapter": ((False,), "fluid trains a new adapter on the base model"),
    "adapter_name_or_path": ((None,), "fluid trains a new adapter on the base model"),
    "quantization_bit": ((None,), "fluid trains unquantized weights"),
    "quantization_method": ((None,), "fluid trains unquantized weights"),
    "rope_scaling": ((None,), "fluid keeps the model's position embeddings"),
    "neftune_noise_alpha": ((None, 0), "fluid adds no embedding noise"),
    "resize_vocab": ((False,), "fluid adds only its mask token"),
    "new_special_tokens": ((None,), "fluid adds only its mask token"),
    "streaming": ((False,), "prepare-data reads whole datasets"),
    "mix_strategy": (("concat",), "fluid concatenates datasets"),
    "interleave_probs": ((None,), "fluid concatenates datasets"),
    "tokenized_path": ((None,), "fluid prepares data with `fluid prepare-data`"),
    "default_system": ((None,), "the chat template's own default system prompt applies"),
    "tool_format": ((None,), "tool calls use the chat template's own format"),
    "optim": (("adamw_torch", "adamw_torch_fused"), "fluid trains with AdamW (torch)"),
    "warmup_steps": ((0, None), "set warmup_ratio instead"),
    "lr_scheduler_kwargs": ((None, {}), "fluid's schedules take no options"),
    "pure_bf16": ((False,), "fluid keeps fp32 master weights (bf16: true is mixed precision)"),
    "resume_from_checkpoint": ((None,), "resume with `fluid train-stage1 --resume`"),
    "use_galore": ((False,), "fluid trains with AdamW"),
    "use_apollo": ((False,), "fluid trains with AdamW"),
    "use_badam": ((False,), "fluid trains with AdamW"),
    "use_muon": ((False,), "fluid trains with AdamW"),
    "use_adam_mini": ((False,), "fluid trains with AdamW"),
    "use_llama_pro": ((False,), "fluid trains LoRA or every weight"),
    "use_dft_loss": ((False,), "fluid trains with its own Stage I loss"),
    "use_asft_loss": ((False,), "fluid trains with its own Stage I loss"),
    "use_eaft_loss": ((False,), "fluid trains with its own Stage I loss"),
    "fp8": ((False,), "fluid trains in bf16, fp16 or fp32"),
    "mixture_of_depths": ((None,), "fluid keeps every layer"),
}
ACCELERATE_DEEPSPEED = """\
# Written by fluid from {config}: DeepSpeed through accelerate, configured by {json}.
# One process: set [launch] num_processes (e.g. --set launch.num_processes=8) for more.
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {json}
  zero3_init_flag: false
machine_rank: 0
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
use_cpu: false
"""

notices = Console(stderr=True, soft_wrap=True, markup=False)  # notices name tables: [data] is text, not markup


def translate(text: str, file: str) -> tuple[dict, dict[tuple[str, ...], str]]:
    """A LLaMA-Factory YAML config as a raw fluid recipe, and for each fluid key it set where that came from
    (`file:line: yaml_key`, the start of an error about it)."""
    config, lines = _parse(text, file)
    raw: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}

    def at(key: str) -> str:
        return f"{file}:{lines[key]}" if key in lines else file

    def put(fluid_key: str, value: Any, key: str) -> None:
        table, name = fluid_key.split(".")
        raw.setdefault(table, {})[name] = value
        if key in config:
            origins[(table, name)] = f"{at(key)}: {key}"

    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if config.get(key) is not None else default

    stage, finetuning = get("stage", "sft"), get("finetuning_type", "lora")
    if stage != "sft":
        raise FluidError(f"{at('stage')}: stage: {stage!r} is not supported (fluid's Stage I is supervised "
                         "fine-tuning, stage: sft)")
    if finetuning not in ("lora", "full"):
        raise FluidError(f"{at('finetuning_type')}: finetuning_type: {finetuning!r} is not supported (lora or full)")
    for key, (neutral, why) in REFUSED.items():
        if key in config and config[key] not in neutral:
            raise FluidError(f"{at(key)}: {key}: {config[key]!r} is not supported ({why})")
    ignored = [k for k in config if k in IGNORED or k.startswith(IGNORED_PREFIXES)]
    unknown = [k for k in config if k not in KEYS and k not in SPECIAL and k not in REFUSED and k not in ignored]
    if unknown:
        raise FluidError(f"{at(unknown[0])}: {unknown[0]}: not a LLaMA-Factory key that fluid knows (see the "
                         "README, \"Coming from LLaMA-Factory\")")
    if get("do_train", True) is not True:
        raise FluidError(f"{at('do_train')}: do_train: false: nothing to train (fluid translates training configs)")

    for key, (fluid_keys, default) in KEYS.items():
        value = _number(get(key, default), default)
        if value is not None:
            for fluid_key in fluid_keys:
                put(fluid_key, value, key)
    for key, kind, want in (("output_dir", str, "a folder name"), ("enable_thinking", bool, "true or false")):
        if get(key) is not None and not isinstance(config[key], kind):  # a list or a number is no path; 'maybe' no bool
            raise FluidError(f"{at(key)}: {key}: expected {want}, got {config[key]!r}")
    output_dir = Path(get("output_dir", "trainer_output"))
    put("data.output_dir", str(output_dir.with_name(output_dir.name + "-data")), "output_dir")

    names = get("dataset")
    if names is not None:
        if not isinstance(names, (str, list)):  # a mapping's keys, or a number, are no list of names
            raise FluidError(f"{at('dataset')}: dataset: expected names (a, b or a list), got {names!r}")
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        put("data.dataset_dir", get("dataset_dir", "data"), "dataset_dir")
        put("data.sources", [{"dataset": name} for name in names], "dataset")
    template = get("template")
    if template is not None:
        put("data.template", "none" if template == "empty" else "auto", "template")
        notices.print(f"{at('template')}: template {template!r}: fluid renders "
                      + ("raw text (template = \"none\")" if template == "empty" else
                         "through the tokenizer's own chat template ([data] template = \"auto\")"))
    if "enable_thinking" in config:
        put("data.template_kwargs", {"enable_thinking": config["enable_thinking"]}, "enable_thinking")
    elif str(template).endswith("_nothink"):  # LLaMA-Factory's templates that switch thinking off (qwen3_nothink)
        put("data.template_kwargs", {"enable_thinking": False}, "template")

    put("lora.enabled", finetuning == "lora", "finetuning_type")
    put("lora.alpha", _number(get("lora_alpha", 2 * raw["lora"]["r"]), 0), "lora_alpha")
    target = get("lora_target", "all")
    put("lora.target_modules", "all-linear" if target == "all" else
        [t.strip() for t in target.split(",")] if isinstance(target, str) else target, "lora_target")
    max_steps = _number(get("max_steps", -1), 0)
    if max_steps != -1:
        put("train.max_steps", max_steps, "max_steps")
    scheduler = get("lr_scheduler_type", "linear")
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise FluidError(f"{at('lr_scheduler_type')}: lr_scheduler_type: {scheduler!r} is not supported "
                         f"({', '.join(SCHEDULERS)})")
    put("train.lr_scheduler", SCHEDULERS[scheduler], "lr_scheduler_type")
    if scheduler == "constant":  # transformers' constant schedule has no warmup
        put("train.warmup_ratio", 0.0, "lr_scheduler_type")
    put("launch.mixed_precision", "bf16" if get("bf16") else "fp16" if get("fp16") else "no",
        "bf16" if "bf16" in config else "fp16")
    put("train.gradient_checkpointing", bool(get("gradient_checkpointing", not get("disable_gradient_checkpointing"))),
        "gradient_checkpointing" if "gradient_checkpointing" in config else "disable_gradient_checkpointing")
    if get("deepspeed") is not None:
        put("launch.accelerate_config", _deepspeed(str(config["deepspeed"]), file, at("deepspeed"),
                                                   raw["train"]["batch_size"]), "deepspeed")
    if ignored:
        notices.print(f"{file}: ignored (they change nothing in what fluid trains): {', '.join(ignored)}")
    return raw, origins


def _parse(text: str, file: str) -> tuple[dict, dict[str, int]]:
    """The YAML's top-level mapping, and the line of each key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise FluidError(f"{file}:{mark.line + 1 if mark else 1}: invalid YAML "
                         f"({getattr(e, 'problem', None) or e})") from None
    if not isinstance(config, dict) or not isinstance(node, yaml.MappingNode):
        raise FluidError(f"{file}: expected a LLaMA-Factory config (a mapping of keys to values)")
    named = [k for k in config if not isinstance(k, str)]
    if named:
        raise FluidError(f"{file}: {named[0]!r}: expected a key name (a LLaMA-Factory argument)")
    lines: dict[str, int] = {}
    for k, _ in node.value:
        if isinstance(k, yaml.ScalarNode):
            if k.value in lines:  # PyYAML keeps the last silently; which one the user meant is anyone's guess
                raise FluidError(f"{file}:{k.start_mark.line + 1}: {k.value}: given twice (first on line "
                                 f"{lines[k.value]}); keep one")
            lines[k.value] = k.start_mark.line + 1
    return config, lines


def _number(value: Any, default: Any) -> Any:
    """PyYAML reads `5e-5` (no dot) as text, which LLaMA-Factory's argument parser takes as a number: so do we for
    a numeric key."""
    if isinstance(value, str) and isinstance(default, (int, float)):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                continue
    return value


def _deepspeed(json_path: str, config: str, where: str, batch_size: Any) -> str:
    """Write the accelerate config that runs DeepSpeed with `json_path`; return its path."""
    path = Path(json_path)
    if not path.is_file():
        raise FluidError(f"{where}: deepspeed: {path} " + ("is a folder, not a DeepSpeed JSON file" if path.is_dir()
                                                           else "not found"))
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FluidError(f"{where}: deepspeed: {path} is not a JSON file ({e})") from None
    if not isinstance(ds, dict):
        raise FluidError(f"{where}: deepspeed: {path} is not a DeepSpeed config (a JSON object), got "
                         f"{json.dumps(ds)[:40]}")
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro != batch_size:
        # accelerate fills an "auto" micro-batch size only from a DataLoader passed to prepare(); fluid's loop
        # batches its rows itself.
        raise FluidError(f"{where}: deepspeed: {path} has train_micro_batch_size_per_gpu = {json.dumps(micro)}; "
                         f"write {batch_size} (per_device_train_batch_size) there, as fluid's training has no "
                         "DataLoader for accelerate to read it from")
    out = Path(config).with_name(Path(config).stem + ".accelerate.yaml")
    write_text_atomic(out, ACCELERATE_DEEPSPEED.format(config=config, json=path.resolve()))
    notices.print(f"{where}: deepspeed: wrote {out} (accelerate with DeepSpeed, reading {path})")
    return str(out)

