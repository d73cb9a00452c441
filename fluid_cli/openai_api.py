"""OpenAI's API as `fluid serve` speaks it: the request bodies, what is refused, the error shape, the text.

A request body is checked field by field; what the server cannot honour is refused with a 400 in OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}` naming the field (the `openai` client raises
`BadRequestError`), never silently ignored: several choices (`n > 1`), log-probabilities, `echo`, `suffix`, tools,
presence or frequency penalties, logit biases. Fields the API defines that do not change the output (`user`,
`metadata`, ...) are ignored.

Sampling: `temperature`, `top_p`, `seed` and `top_k` (in the client's `extra_body`) are read in one place,
`SamplingFields`. A request without `temperature` decodes as the server's `[generate]` table says (greedy unless it
sets a temperature), `temperature = 0` greedily; either way verified FLUID decoding writes exactly the model's greedy
output, or tokens that follow its own warped distribution exactly (speculative sampling). Unlike OpenAI's API, whose
default temperature is 1, the default is greedy: a `top_p` or `top_k` without a temperature is refused rather than
silently ignored.

Stop strings end the text before them, as OpenAI's API does (`fluid generate` keeps them, as HF generate does):
`CompletionText` holds back, while streaming, text that may be the start of a stop string, so the streamed deltas
join to the same text as the whole response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from fluid_cli.acceptance import GREEDY, Sampling
from fluid_cli.prompts import IncrementalText

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# --------------------------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's: the client sends it in `extra_body`
    seed: int | None = None

    def refuse_unsupported(self) -> None:
        if self.n is not None and self.n != 1:
            raise bad_request("n", f"{self.n} choices asked for; this server writes one choice per request (n = 1)")
        if self.logprobs:
            raise bad_request("logprobs", "log-probabilities are not returned by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(name, "penalties are not supported (decoding is greedy, and verified)")
        if self.logit_bias:
            raise bad_request("logit_bias", "logit biases are not supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "only allowed with stream = true")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad_request("max_tokens", f"{self.max_tokens}: must be at least 1")

    def limit(self) -> int | None:
        """The most tokens to generate that the request asks for (None: the server's default)."""
        return self.max_tokens

    def stops(self) -> list[str] | None:
        """The stop strings (None: the server's default)."""
        if self.stop is None:
            return None
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4:
            raise bad_request("stop", f"{len(stops)} stop sequences; at most 4")
        return [s for s in stops if s]

    def sampling(self) -> SamplingFields:
        return SamplingFields(self.temperature, self.top_p, self.top_k, self.seed)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self, index: int) -> str:
        """The content as text (text parts joined; other parts, such as images, are refused)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for n, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages.{index}.content.{n}", "only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    top_logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise bad_request(name, "tool and function calling are not supported")
        if self.top_logprobs:
            raise bad_request("top_logprobs", "log-probabilities are not returned by this server")
        if not self.messages:
            raise bad_request("messages", "at least one message is needed")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise bad_request("max_completion_tokens", f"{self.max_completion_tokens}: must be at least 1")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (`developer` is the newer name of `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise bad_request("echo", "echoing the prompt is not supported")
        if self.suffix:
            raise bad_request("suffix", "insertion (a suffix) is not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise bad_request("prompt", f"{len(self.prompt)} prompts; send one prompt per request")
        if not self.prompt:
            raise bad_request("prompt", "empty prompt: decoding needs at least one token to condition on")

    def text_or_ids(self) -> str | list[int]:
        """The prompt: text, or token ids."""
        prompt = self.prompt
        return prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], str) else prompt


def parse(body_type: type[_Body], raw: Any, model: str) -> _Body:
    """A request body for the model named `model`, checked: a wrong field is a 400 naming it, another model a
    404."""
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = body_type.model_validate(raw)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise ApiError(400, f"{param}: {error['msg']}", param=param) from None
    if body.model != model:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model!r}", param="model",
                       code="model_not_found")
    body.refuse_unsupported()
    return body


@dataclass(frozen=True)
class SamplingFields:
    """The sampling fields of a request, in one place (None: not given). Absent, or `temperature` 0, means greedy
    decoding."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None

    def resolve(self, default: Sampling) -> Sampling:
        """The request's sampling: its fields over the server's `default`; `temperature = 0` is greedy decoding
        (its `top_p`, `top_k` and `seed` unused). A value without meaning is a 400 naming its field.

            >>> SamplingFields(0.7, 0.9, None, 3).resolve(GREEDY)
            Sampling(temperature=0.7, top_p=0.9, top_k=0, seed=3)
            >>> SamplingFields(None, None, None, 3).resolve(GREEDY).greedy
            True
        """
        asked = Sampling(default.temperature if self.temperature is None else self.temperature,
                         default.top_p if self.top_p is None else self.top_p,
                         default.top_k if self.top_k is None else self.top_k,
                         default.seed if self.seed is None else self.seed)
        if (problem := asked.problem()) is not None:
            raise bad_request(*problem)
        if asked.greedy:
            narrowed = "top_p" if (self.top_p or 1) < 1 else "top_k" if self.top_k else None
            if narrowed is not None and self.temperature is None:
                raise bad_request(narrowed, "this server decodes greedily unless a request sets a temperature: send "
                                            "temperature > 0 with it")
            return GREEDY
        return asked


# --------------------------------------------------------------------------------------------- the text


class CompletionText:
    """A completion's text as its blocks arrive, ending before the first stop string.

    `add` returns the text that is settled: an incomplete UTF-8 character waits (`IncrementalText`), and so does
    any end of the text that may be the start of a stop string; `finish` returns the rest. The whole response's
    text is `add(all ids) + finish()`, so the streamed deltas join to it exactly.

        >>> from fluid_cli.tokenizer import build_char_tokenizer
        >>> tok = build_char_tokenizer()
        >>> text = CompletionText(tok, ["END"])
        >>> [text.add(tok.encode(s, add_special_tokens=False)) for s in ("ab", "cE", "N", "D!")], text.finish()
        (['ab', 'c', '', ''], '')
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.decoded = IncrementalText(tokenizer)
        self.stops = stops
        self.text = ""  # decoded so far
        self.sent = 0  # characters handed out

    def add(self, ids: list[int]) -> str:
        self.text += self.decoded.add(ids) or ""
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoded.rest()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        end = min(found) if found else len(self.text)
        if not final and not found:  # the end may yet become a stop string
            end -= max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])),
                       default=0)
        new = self.text[self.sent:max(end, self.sent)]
        self.sent += len(new)
        return new
