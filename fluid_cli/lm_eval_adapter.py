"""The lm-evaluation-harness model `fluid`: FLUID (or plain greedy) generation, causal log-likelihoods.

`generate_until` decodes the requests with `fluid_cli.decode.Decoder`, `batch_size` at a time (`decoder=ar`:
plain greedy decoding of the same weights through the same loop), honouring each request's stop strings (`until`,
plus EOS) and `max_gen_toks`; decoding is always greedy. `loglikelihood` and `loglikelihood_rolling` are ordinary causal
forwards of the backbone, batched, so multiple-choice tasks such as MMLU work as for any causal LM.

Registering: importing this module registers the model name `fluid` with lm-eval. lm-eval 0.4.13 has no hook
that imports third-party code before it looks a model name up (no entry points, and `--include_path` only
indexes task YAMLs), so the harness's own command line is run through this module, which registers `fluid`
first and then hands every argument to lm-eval's `cli_evaluate`::

    python -m fluid_cli.lm_eval_adapter --model fluid --model_args model=runs/stage1,decoder=fluid \\
        --tasks gsm8k --limit 20

From Python, import this module and call `lm_eval.simple_evaluate(model="fluid", ...)`, or pass a `FluidLM`.

Model arguments (`--model_args k=v,...`): `model` (a FLUID model directory; with `decoder=ar` also a plain
transformers model directory), `decoder` (fluid | ar), `horizon`, `tau`, `threshold`, `max_k`, `min_k`, `verify`
(the `DecodeSettings` of `fluid generate`), `max_length` (context, defaults to the model's), `max_gen_toks` (when a
task sets none), `dtype` (auto | float32 | bfloat16 | float16), `add_bos_token`. lm-eval's own `--batch_size`
(log-likelihood requests per forward) and `--device` (its default `cuda:0` falls back to the CPU without a GPU)
are passed through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: `fluid` is added to them, not alone)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fluid_cli.acceptance import GREEDY, Sampling
from fluid_cli.config import DECODERS
from fluid_cli.decode import DecodeSettings, Decoder, Request, ar_settings
from fluid_cli.errors import FluidError
from fluid_cli.folder import load_for_inference
from fluid_cli.hf import context_length
from fluid_cli.model import FluidModel
from fluid_cli.prompts import check_no_mask_token, stop_strings

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 2048  # when the model's config names no context length


def resolve_device(device: str | None) -> str:
    """lm-eval's command line defaults to `cuda:0`; run on the CPU where there is no GPU."""
    if device and (not device.startswith("cuda") or torch.cuda.is_available()):
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_model("fluid")
class FluidLM(TemplateLM):
    """lm-eval `LM` over a `FluidModel`. `samples` collects one record per generated request (the text and its
    decode statistics), which `fluid eval` turns into the speed columns and the per-sample files."""

    def __init__(
        self,
        model: str | FluidModel,
        decoder: str = "fluid",
        horizon: str = "auto",
        tau: float | None = None,
        threshold: float | None = None,
        max_k: int | None = None,
        min_k: int = 1,
        verify: bool = True,
        compile: bool = False,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batches here are fixed
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str = "auto",
        add_bos_token: bool = False,
        mask_token: str | None = None,  # plain models only: the existing token their drafts use
        trust_remote_code: bool = False,  # plain models only: a FLUID folder records it in fluid.json
        temperature: float | None = None,  # sample every generation at this temperature (None: as each task says)
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 1234,  # request i of the evaluation samples with seed + i
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise FluidError(f"decoder={decoder!r}: expected one of {', '.join(DECODERS)}")
        self.decoder = decoder
        if isinstance(model, FluidModel):
            self.model = model
        else:
            self.model = load_for_inference(model, device=resolve_device(device), dtype=dtype, mask_token=mask_token,
                                            max_k=max_k, trust_remote_code=trust_remote_code)
        self._device = self.model.device
        self.tokenizer = self.model.tokenizer
        self.settings = DecodeSettings(horizon=horizon, tau=tau, threshold=threshold, max_k=max_k, min_k=min_k,
                                       verify=verify, compile=compile, eos_token_ids=(self.tokenizer.eos_token_id,))
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE  # "auto" too
        if self.batch_size < 1:
            raise FluidError(f"batch_size={batch_size}: must be at least 1")
        self._max_length = max_length or context_length(self.model.lm.config) or DEFAULT_MAX_LENGTH
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        # None: each task's own settings; a temperature of 0 given to the model is greedy decoding for every task
        self.sampling = None if temperature is None else Sampling(float(temperature), float(top_p), int(top_k))
        if self.sampling is not None:
            self.sampling.check()
        self.seed, self.requests = int(seed), 0
        self.samples: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []  # one record per generate_until call: the decoder and its BatchStats
        # One decoder per kind for the whole evaluation: forward costs are measured once, and acceptance statistics
        # carry over from request to request.
        self._decoders: dict[str, Decoder] = {}
        # Log-likelihoods do not depend on the decoder: `fluid eval --decoder both` reuses them across its runs.
        self._loglikelihoods: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, bool]] = {}

    def decoder_for(self, name: str) -> Decoder:
        if name not in self._decoders:
            settings = self.settings if name == "fluid" else ar_settings(self.settings)
            self._decoders[name] = Decoder(self.model, settings, batch_size=self.batch_size)
        return self._decoders[name]

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.add_bos_token and self.tokenizer.bos_token_id is not None \
            else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        check_no_mask_token(string, self.tokenizer, self.model.meta.mask_token, "an lm-eval request")
        return self.tokenizer.encode(string, add_special_tokens=special)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def check_chat_template(self) -> None:
        """Chat-templated prompts need the tokenizer's template: refused in one line where there is none."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise FluidError(f"apply_chat_template: the tokenizer of {self.tokenizer.name_or_path} has no chat "
                             "template; evaluate with plain prompts")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.check_chat_template()
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results `config`."""
        s = self.settings
        return {"fluid_decoder": self.decoder, "fluid_settings": {
            "horizon": s.horizon, "tau": s.tau, "threshold": s.threshold, "max_k": s.max_k, "min_k": s.min_k,
            "verify": s.verify}}

    # -- log-likelihoods -----------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """`(sum of log p(continuation | context), whether greedy decoding would produce it)` per request.

        Requests run longest first, `batch_size` at a time, right-padded: padding after a sequence cannot change
        its causal forward. Logits are computed only at the continuation's positions.
        """
        keys = [(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
        todo = sorted({k for k in keys if k not in self._loglikelihoods}, key=lambda k: -len(k[0] + k[1]))
        with self._progress(len(todo), "log-likelihood", disable_tqdm) as advance:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start: start + self.batch_size]
                self._loglikelihoods.update(zip(batch, self._score_batch(batch)))
                advance(len(batch), 0)
        return [self._loglikelihoods[k] for k in keys]

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[float, bool]]:
        # The model reads at most max_length tokens: the context is cut on the left, the continuation kept whole.
        rows = [list(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        hidden = self.model.hidden_states(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                          use_cache=False).last_hidden_state
        scores = []
        for i, ((_, cont), r) in enumerate(zip(batch, rows)):
            n = len(cont)
            logp = torch.log_softmax(self.model.logits(hidden[i, len(r) - n: len(r)]).float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            scores.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return scores

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of the model's context (as lm-eval's HF model)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        return totals

    # -- generation ----------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Every request decoded by the current decoder, `batch_size` at a time (a finished request makes room for
        the next), each with its own stop strings and token limit."""
        untils, batch = [], []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
            max_new = int(kwargs["max_gen_toks"])
            # As lm-eval's HF model: keep the end of the context so that it and the generation fit the model.
            prompt = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
            untils.append(until)
            batch.append(Request(prompt, max_new_tokens=max_new, stop=stop_strings(self.tokenizer, until),
                                 sampling=self.sampling_for(gen_kwargs, kwargs)))
        with self._progress(len(requests), f"generate ({self.decoder})", disable_tqdm) as advance:
            results, stats = self.decoder_for(self.decoder).run(
                batch, on_done=lambda _, result: advance(1, result.stats.new_tokens))
        self.batches.append({"decoder": self.decoder, "tasks": sorted({r.task_name for r in requests}),
                             **stats.to_dict()})
        texts = []
        for req, until, result in zip(requests, untils, results):
            text = postprocess_generated_text(self.tok_decode(result.tokens), until, None)
            texts.append(text)
            self.samples.append({"task": req.task_name, "doc_id": req.doc_id, "decoder": self.decoder,
                                 "output": text, "stats": result.stats.to_dict(), "batch": len(self.batches) - 1})
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def sampling_for(self, asked: dict[str, Any], kwargs: dict[str, Any]) -> Sampling:
        """How one request decodes: the `temperature` given to the model if any, else what the task's generation
        kwargs say (`do_sample` with its temperature, as HF's default 1.0 when it names none, top-p and top-k), else
        greedy. A sampled request gets the next seed of the evaluation (`seed + i`), so a run is reproducible."""
        sampling = self.sampling
        if sampling is None and kwargs.get("do_sample"):
            temperature = float(asked.get("temperature", 1.0))
            if temperature > 0:
                sampling = Sampling(temperature, float(kwargs.get("top_p", 1.0)), int(kwargs.get("top_k") or 0))
                sampling.check("the task's generation kwargs")
        if sampling is None or sampling.greedy:
            return GREEDY
        self.requests += 1
        return replace(sampling, seed=self.seed).nth(self.requests - 1)

    def warm_up(self, decoders: list[str]) -> None:
        """Decode a few tokens with each of `decoders`, so that one-time costs (allocations, kernel choices, the
        forward-cost probe) are not timed as part of whichever decoder runs first."""
        prompt = self.tok_encode("Question: 1 + 1?\nAnswer:")
        for decoder in decoders:
            self.decoder_for(decoder).run([Request(prompt, max_new_tokens=4)])

    @contextmanager
    def _progress(self, total: int, label: str, disabled: bool) -> Iterator[Callable[[int, int], None]]:
        """A rich progress bar on stderr; yields `advance(requests, new_tokens)`."""
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[rate]}"))
        with Progress(*columns, console=Console(stderr=True), disable=disabled or total == 0) as bar:
            task = bar.add_task(label, total=total, rate="")
            tokens = 0

            def advance(n: int, new_tokens: int) -> None:
                nonlocal tokens
                tokens += new_tokens
                elapsed = bar.tasks[0].elapsed or 0.0
                rate = f"{tokens / elapsed:.1f} tok/s" if tokens and elapsed > 0 else ""
                bar.update(task, advance=n, rate=rate)

            yield advance


def main() -> None:
    """lm-eval's command line with `fluid` registered; a user mistake in the fluid model's arguments (a bad
    `decoder`, a missing model) is one line on stderr and exit status 2, as in `fluid`'s own commands."""
    import sys

    import typer
    from lm_eval.__main__ import cli_evaluate

    from fluid_cli.cli import user_errors

    try:
        with user_errors():
            cli_evaluate()
    except typer.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
