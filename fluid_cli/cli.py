"""The `fluid` command. Each subcommand is thin: parse, load the recipe, call the module's `run`.

Heavy imports (torch, transformers) happen inside the commands so that `fluid --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fluid_cli import __version__
from fluid_cli.config import DECODERS, EVAL_DECODERS, HORIZONS
from fluid_cli.errors import FluidError

app = typer.Typer(
    name="fluid",
    help="FLUID: adapt a causal LM to write several tokens per forward pass, decode it, and measure it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="TOML recipe file, or a LLaMA-Factory YAML config.",
                                           show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe value, e.g. --set train.lr=1e-4 (repeatable).", show_default=False),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `FluidError` into one red line on stderr and exit status 2 (no traceback); so too a closed pipe on
    stdout (`fluid generate | head -1`), whose reader is gone."""
    try:
        yield
    except FluidError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point stdout at nothing first.
        with suppress(OSError, ValueError):  # a stdout without a file descriptor has nothing to flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        err_console.print("[bold red]error:[/] stdout was closed before the output was written (the reading end of "
                          "the pipe exited)")
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fluid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """FLUID toolkit."""


def _recipe_with_flags(recipe: Optional[Path], set_: Optional[list[str]], flags: dict[str, tuple[str, object]]):
    """The recipe (or the defaults) with `--set`, then the command's flags (`{"--tau": ("generate.tau", value)}`):
    flags win, are validated like any recipe value, and an error in one names the flag. Flags left unset (None)
    change nothing."""
    from fluid_cli.config import Flag, load_recipe, load_recipe_text

    def plain(value: object) -> object:
        return value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value

    def text(flag: str, value: object) -> str:
        if isinstance(value, bool):  # an on/off flag: its name says it
            return flag
        shown = value if isinstance(value, list) else [value]
        return " ".join(f"{flag} {f'{v:g}' if isinstance(v, float) else v}" for v in shown)

    given = [Flag(key, plain(value), text(flag, plain(value))) for flag, (key, value) in flags.items()
             if value is not None]
    return load_recipe(recipe, set_, given) if recipe else load_recipe_text("", set_, flags=given)


def _generate_flags(**flags: object) -> dict[str, tuple[str, object]]:
    """The `[generate]` flags shared by `fluid generate` and `fluid bench decode`, by their keys."""
    names = {"model_dir": "--model", "verify": "--no-verify", "compile": "--compile"}
    return {names.get(k, "--" + k.replace("_", "-")): (f"generate.{k}", v) for k, v in flags.items()}


@app.command("recipe")
def recipe(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe and print it fully resolved (defaults filled in, overrides applied)."""
    from fluid_cli.config import dump_recipe, load_recipe

    with user_errors():
        typer.echo(dump_recipe(load_recipe(recipe, set_)), nl=False)


@app.command("prepare-data")
def prepare_data(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder (atomically).")
    ] = False,
) -> None:
    """Tokenize the \\[data] sources into a prompt-masked training set at \\[data] output_dir."""
    from fluid_cli import data
    from fluid_cli.config import load_recipe

    with user_errors():
        data.run(load_recipe(recipe, set_), overwrite=overwrite)


@app.command("train-stage1")
def train_stage1(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the output.")] = False,
    accelerate_config: Annotated[
        Optional[Path],
        typer.Option("--accelerate-config", help="Run under `accelerate launch` with this config file "
                     "(DDP, FSDP, DeepSpeed; see recipes/accelerate/).", show_default=False),
    ] = None,
) -> None:
    """Stage I: train the backbone on next-token and mask-block prediction; writes a FLUID model to \\[train] output_dir."""
    from fluid_cli import launch
    from fluid_cli.config import load_recipe

    with user_errors():
        cfg = load_recipe(recipe, set_)
        from fluid_cli import train

        train.preflight(cfg, resume)
        if launch.needs_launch(cfg.launch, accelerate_config):
            args = ["train-stage1", str(recipe), *(a for s in set_ or [] for a in ("--set", s))]
            raise typer.Exit(launch.relaunch(cfg.launch, accelerate_config, args + (["--resume"] if resume else [])))
        train.run(cfg, resume=resume)


@app.command("calibrate-khead")
def calibrate_khead(
    recipe: RecipeArg,
    set_: SetOpt = None,
    tau: Annotated[
        Optional[str],
        typer.Option("--tau", help="Threshold in nats (replaces \\[khead] tau), or a sweep 2.0,2.8,3.5: one head per "
                     "value, each reported; the one for \\[khead] tau is saved.", show_default=False),
    ] = None,
) -> None:
    """Stage II: fit the K-head on the frozen Stage I model in \\[khead] model_dir and save it there."""
    from fluid_cli import calibrate
    from fluid_cli.config import load_recipe

    with user_errors():
        calibrate.run(load_recipe(recipe, set_), taus=calibrate.parse_taus(tau) if tau is not None else None)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A typer choice type from one of the recipe schema's choice lists."""
    return Enum(name, {value: value for value in values}, type=str)


EvalDecoder = _choices("EvalDecoder", EVAL_DECODERS)
ServeDecoder = _choices("ServeDecoder", DECODERS)


@app.command("eval")
def eval_(
    tasks: Annotated[
        Optional[list[str]],
        typer.Argument(help="gsm8k, gsm8k_cot, math500, humaneval, mmlu, arithmetic, or any lm-eval task, group or "
                       "tag (default: \\[eval] tasks).", show_default=False),
    ] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="FLUID model directory (with --decoder ar also a "
                                                  "plain transformers model).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N samples of each task.",
                                                 show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples (default: the "
                                                       "task's).", show_default=False)] = None,
    decoder: Annotated[Optional[EvalDecoder], typer.Option("--decoder", help="fluid, ar (plain decoding: greedy, "
                                                           "or sampled with --temperature) or both (side by side).",
                                                           show_default=False)] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", help="Horizon threshold (default: the model's calibrated "
                                                 "tau).", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Confidence for filling draft slots "
                                                       "early.", show_default=False)] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Local benchmark files laid out like "
                                                     "../shared/data (default: $FLUID_DATA_DIR, else the hub).",
                                                     show_default=False)] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Where results.json and "
                                                       "samples_<task>.jsonl go.", show_default=False)] = None,
    apply_chat_template: Annotated[bool, typer.Option("--apply-chat-template", help="Wrap prompts in the "
                                                      "tokenizer's chat template.")] = False,
    allow_code_execution: Annotated[bool, typer.Option("--allow-code-execution", help="Let HumanEval run the "
                                                       "generated programs (subprocess, timeout).")] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Requests decoded (and log-likelihoods "
                                                      "scored) together (default 8).", show_default=False)] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Fixed-shape decode steps through torch.compile.")] = False,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sample every generation task at "
                                                         "this temperature (default: each task's own generation "
                                                         "settings; greedy where it has none).",
                                                         show_default=False)] = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed: request i samples with seed + i "
                                                "(default 1234).", show_default=False)] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe (\\[eval], \\[generate]).",
                                                   show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results already in the output "
                                            "folder.")] = False,
    set_: SetOpt = None,
) -> None:
    """Benchmark a model through lm-evaluation-harness: accuracy, tokens per forward, tokens/s (AR vs FLUID)."""
    with user_errors():
        from fluid_cli.task_names import check_task_names

        cfg = _recipe_with_flags(recipe, set_, {
            "TASK": ("eval.tasks", tasks or None), "--model": ("eval.model_dir", model),
            "--limit": ("eval.limit", limit), "--num-fewshot": ("eval.num_fewshot", num_fewshot),
            "--decoder": ("eval.decoder", decoder), "--data-dir": ("eval.data_dir", data_dir),
            "--output-dir": ("eval.output_dir", output_dir),
            "--apply-chat-template": ("eval.apply_chat_template", apply_chat_template or None),
            "--allow-code-execution": ("eval.allow_code_execution", allow_code_execution or None),
            "--tau": ("generate.tau", tau), "--threshold": ("generate.threshold", threshold),
            "--batch-size": ("eval.batch_size", batch_size), "--compile": ("generate.compile", compile_ or None),
            "--temperature": ("generate.temperature", temperature), "--top-p": ("generate.top_p", top_p),
            "--top-k": ("generate.top_k", top_k), "--seed": ("generate.seed", seed),
        })
        check_task_names(cfg.eval.tasks)  # in a second, before lm-eval's import and task index (half a minute)
        from fluid_cli import evaluate

        evaluate.run(cfg, overwrite=overwrite)


# -- decoding: `fluid generate` and `fluid bench decode` share the [generate] flags ----------------------------
Horizon = _choices("Horizon", HORIZONS)


OptionalRecipeArg = Annotated[
    Optional[Path], typer.Argument(help="TOML recipe (optional): its \\[generate] table; flags override it.",
                                   show_default=False)
]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="FLUID model directory (a plain transformers "
                                                  "model with --horizon fixed/entropy).", show_default=False)]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text (repeatable).",
                                                        show_default=False)]
PromptFileOpt = Annotated[Optional[Path], typer.Option("--prompt-file", help="One prompt per line, or JSONL with "
                                                       "prompt/question/input/text or messages.", show_default=False)]
ChatTemplateOpt = Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template", help="Wrap prompts in "
                                                         "the tokenizer's chat template (default: on).",
                                                         show_default=False)]
HorizonOpt = Annotated[Optional[Horizon], typer.Option("--horizon", help="cost: the most expected tokens per unit "
                                                       "of time (draft confidences, measured forward costs); khead: "
                                                       "the K-head's K* at tau; fixed: always max-k; entropy: from a "
                                                       "first draft's entropy; auto (default): cost, or without "
                                                       "verification khead if calibrated, else entropy.",
                                                       show_default=False)]
TauOpt = Annotated[Optional[float], typer.Option("--tau", help="khead/entropy horizon threshold in nats (default: "
                                                 "the model's calibrated tau; `fluid calibrate-khead` shows the "
                                                 "per-slot loss scale).", show_default=False)]
ThresholdOpt = Annotated[Optional[float], typer.Option("--threshold", help="Fill a draft slot early when its top "
                                                       "probability exceeds this (default 0 with verification: every "
                                                       "slot from the first draft; 0.9 without; 1 = never).",
                                                       show_default=False)]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Prompts decoded together (default 1).",
                                                     show_default=False)]
CompileOpt = Annotated[bool, typer.Option("--compile", help="Fixed-shape decode steps through torch.compile (CUDA "
                                          "graphs on a GPU).")]
MaxKOpt = Annotated[Optional[int], typer.Option("--max-k", help="Largest block (default: the model's K).",
                                                show_default=False)]
MinKOpt = Annotated[Optional[int], typer.Option("--min-k", help="Smallest block (default 1).", show_default=False)]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Commit drafts unverified (faster, not exactly "
                                           "greedy).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="Sample at this temperature (default 0: "
                                                       "greedy). Exact: verified drafts are accepted by speculative "
                                                       "sampling, so every token follows the model's own "
                                                       "distribution.", show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="Sample from the most likely tokens whose mass "
                                                  "reaches this (default 1: all).", show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the K most likely tokens (default 0: "
                                                "all).", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed: prompt i samples with seed + i "
                                                "(default: a fresh seed, reported in --json).", show_default=False)]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Tokens to generate at most (default "
                                                  "256).", show_default=False)]
MaskTokenOpt = Annotated[Optional[str], typer.Option("--mask-token", help="Draft token for a plain model (default: "
                                                     "its unk, then pad token).", show_default=False)]


@app.command("generate")
def generate(
    recipe: OptionalRecipeArg = None,
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    chat_template: ChatTemplateOpt = None,
    horizon: HorizonOpt = None,
    tau: TauOpt = None,
    threshold: ThresholdOpt = None,
    max_k: MaxKOpt = None,
    min_k: MinKOpt = None,
    no_verify: NoVerifyOpt = False,
    max_new_tokens: MaxNewOpt = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string, kept in the output "
                                                      "(repeatable).", show_default=False)] = None,
    mask_token: MaskTokenOpt = None,
    batch_size: BatchSizeOpt = None,
    compile_: CompileOpt = False,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of streaming.")] = False,
    compare_ar: Annotated[bool, typer.Option("--compare-ar", help="Also decode greedily on the same weights (one token "
                                             "per forward); report the speed-up and whether the outputs match.")] = False,
    compare_base: Annotated[bool, typer.Option("--compare-base", help="Also run the original model (base_model, plain "
                                               "transformers greedy decoding) and report whether the outputs "
                                               "match.")] = False,
    set_: SetOpt = None,
) -> None:
    """Decode prompts with elastic horizons, streaming each committed block in alternating shades."""
    with user_errors():
        from fluid_cli import generate as gen
        from fluid_cli.io import require_stdout
        from fluid_cli.prompts import read_prompts

        require_stdout("the results" if json_output else "the generated text")
        cfg = _recipe_with_flags(recipe, set_, _generate_flags(
            model_dir=model, chat_template=chat_template, horizon=horizon, tau=tau, threshold=threshold, max_k=max_k,
            min_k=min_k, verify=False if no_verify else None, max_new_tokens=max_new_tokens, stop=stop or None,
            mask_token=mask_token, batch_size=batch_size, compile=compile_ or None, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed))
        gen.run(cfg, read_prompts(prompt, prompt_file), json_output=json_output, compare_ar=compare_ar,
                compare_base=compare_base)


@app.command("serve")
def serve(
    recipe: OptionalRecipeArg = None,
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (default 127.0.0.1; 0.0.0.0: "
                                                "every interface).", show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (default 8000).", show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Clients must send `Authorization: Bearer "
                                                   "KEY`.", show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="The model's id for clients (default: "
                                                      "the folder's name).", show_default=False)] = None,
    decoder: Annotated[Optional[ServeDecoder], typer.Option("--decoder", help="fluid (default), or ar: greedy, one "
                                                       "token per forward.", show_default=False)] = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", help="Requests decoded together "
                                                          "(default 16).", show_default=False)] = None,
    max_queue: Annotated[Optional[int], typer.Option("--max-queue", help="Requests waiting for a row (default 64; "
                                                     "more get 429).", show_default=False)] = None,
    set_: SetOpt = None,
) -> None:
    """An OpenAI-compatible HTTP server (chat and text completions, streaming) with continuous batching."""
    with user_errors():
        try:
            from fluid_cli import server
        except ImportError as e:
            raise FluidError(f"fluid serve needs the serve extra ({e.name} is missing): pip install "
                             "\"fluid-cli[serve]\"") from None

        cfg = _recipe_with_flags(recipe, set_, {
            "--model": ("generate.model_dir", model), "--host": ("serve.host", host), "--port": ("serve.port", port),
            "--api-key": ("serve.api_key", api_key), "--model-name": ("serve.model_name", model_name),
            "--decoder": ("serve.decoder", decoder), "--max-batch-size": ("serve.max_batch_size", max_batch_size),
            "--max-queue": ("serve.max_queue", max_queue)})
        server.run(cfg)


bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("decode")
def bench_decode(
    recipe: OptionalRecipeArg = None,
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    prompt_file: PromptFileOpt = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts.", show_default=False)] = None,
    chat_template: ChatTemplateOpt = None,
    horizon: HorizonOpt = None,
    tau: TauOpt = None,
    threshold: ThresholdOpt = None,
    max_k: MaxKOpt = None,
    min_k: MinKOpt = None,
    no_verify: NoVerifyOpt = False,
    max_new_tokens: MaxNewOpt = None,
    mask_token: MaskTokenOpt = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", help="Batch sizes to measure, e.g. 1,4,8 "
                                                      "(default 1).", show_default=False)] = None,
    compile_: CompileOpt = False,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    decoders: Annotated[Optional[str], typer.Option("--decoders", help="Comma-separated, from hf, hf-static, "
                                                    "prompt-lookup, assisted, ar, fluid (default: hf, prompt-lookup, "
                                                    "ar, fluid; assisted too with --draft-model).",
                                                    show_default=False)] = None,
    draft_model: Annotated[Optional[str], typer.Option("--draft-model", help="A small model with the same tokenizer "
                                                       "for assisted generation.", show_default=False)] = None,
    lookup_tokens: Annotated[Optional[int], typer.Option("--lookup-tokens", help="prompt_lookup_num_tokens of "
                                                         "prompt-lookup decoding (default 8).",
                                                         show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the JSON report here.",
                                                   show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output file.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
    set_: SetOpt = None,
) -> None:
    """FLUID against HF generate, prompt-lookup decoding and greedy decoding on one model: tokens/s, tokens per
    forward, identical outputs, per batch size (the recipe's \\[bench] table; flags win)."""
    with user_errors():
        from fluid_cli import bench
        from fluid_cli.io import require_stdout
        from fluid_cli.prompts import read_prompts

        if json_output:
            require_stdout("the JSON report")
        flags = _generate_flags(
            model_dir=model, chat_template=chat_template, horizon=horizon, tau=tau, threshold=threshold, max_k=max_k,
            min_k=min_k, verify=False if no_verify else None, max_new_tokens=max_new_tokens, mask_token=mask_token,
            compile=compile_ or None, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        flags |= {"--prompt-file": ("bench.prompt_file", prompt_file), "--limit": ("bench.limit", limit),
                  "--draft-model": ("bench.draft_model", draft_model),
                  "--lookup-tokens": ("bench.lookup_tokens", lookup_tokens), "--output": ("bench.output", output),
                  "--batch-size": ("bench.batch_sizes", _int_list("--batch-size", batch_size)),
                  "--decoders": ("bench.decoders", decoders.split(",") if decoders else None)}
        cfg = _recipe_with_flags(recipe, set_, flags)
        prompt_path = Path(cfg.bench.prompt_file) if cfg.bench.prompt_file else None
        bench.run(cfg, read_prompts(prompt, prompt_path), json_output=json_output, overwrite=overwrite)


def _int_list(flag: str, text: Optional[str]) -> Optional[list[int]]:
    """`--batch-size 1,4,8` -> [1, 4, 8] (one-line error otherwise)."""
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise FluidError(f"{flag} {text}: expected whole numbers, e.g. 1,4,8") from None


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for every output of the demo.")] = Path("runs/demo"),
    fast: Annotated[bool, typer.Option("--fast", help="Smaller and shorter (CI): still end to end.")] = False,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Another demo recipe.")] = None,
    set_: SetOpt = None,
) -> None:
    """The whole pipeline from nothing on a CPU: data, Stage I from scratch, K-head, generate, eval vs AR."""
    with user_errors():
        from fluid_cli import demo as demo_module

        demo_module.run(out, fast=fast, recipe=recipe, overrides=set_)


PIPED_WIDTH = 200  # columns of rich's output where no standard stream is a terminal


def wide_when_piped(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """rich cuts its output at 80 columns when none of stdin, stdout and stderr is a terminal (a pipe, a log
    file, CI), which cuts or wraps every table: there, unless COLUMNS says otherwise, it gets `PIPED_WIDTH`. Set
    in the environment, so that every console of every command (and of lm-eval's) sees it."""
    if "COLUMNS" in environ:
        return
    for fd in (0, 1, 2):  # the streams rich asks for a size, in its order
        with suppress(OSError, ValueError):
            os.get_terminal_size(fd)
            return
    environ["COLUMNS"] = str(PIPED_WIDTH)


def main() -> None:
    wide_when_piped()
    app()


if __name__ == "__main__":  # `python -m fluid_cli.cli ...` runs the CLI, as `python -m fluid_cli` does
    main()
