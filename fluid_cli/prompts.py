"""Prompts in, token ids out; stop strings as a decoder callback; generated ids back to text as they stream.

Prompts come from `--prompt` (repeatable), a prompt file (one per line, or JSONL rows with `messages` or a text
field) or stdin, and are encoded through the tokenizer's chat template when it has one and it is asked for.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluid_cli.errors import FluidError
from fluid_cli.io import read_text

PROMPT_FIELDS = ("prompt", "question", "input", "text")  # string fields a JSONL prompt file may use

Prompt = str | list[dict[str, str]]  # plain text, or chat messages
StopCallback = Callable[[list[int]], int | None]


def read_prompts(prompts: list[str] | None, prompt_file: Path | None) -> list[Prompt]:
    """Prompts from `--prompt` (repeatable), `--prompt-file` (one per line, or JSONL), else all of stdin."""
    out: list[Prompt] = list(prompts or [])
    if prompt_file is not None:
        out += read_prompt_file(prompt_file)
    if not out:
        if sys.stdin is None or sys.stdin.isatty():
            raise FluidError("no prompt: pass --prompt TEXT or --prompt-file FILE, or pipe the prompt on stdin")
        try:
            out.append(sys.stdin.buffer.read().decode("utf-8").rstrip("\n"))
        except UnicodeDecodeError as e:
            raise FluidError(f"stdin: not UTF-8 text (byte {e.start}); pipe UTF-8 text") from None
    for n, prompt in enumerate(out, start=1):
        if isinstance(prompt, str) and not prompt.strip():
            raise FluidError(f"prompt {n} is empty")
    return out


def read_prompt_file(path: Path) -> list[Prompt]:
    """One prompt per non-empty line; or JSONL rows with `messages` or one of the `PROMPT_FIELDS`; or a JSON array
    of such rows (or of strings)."""
    if path.is_dir():
        raise FluidError(f"{path}: a folder, not a prompt file (name a file in it)")
    if not path.exists():  # a pipe (`--prompt-file <(...)`, /dev/stdin) is read like a file
        raise FluidError(f"{path}: prompt file not found")
    text = read_text(path, "prompt file")
    if text.lstrip().startswith("["):  # a JSON array; text that only starts with a bracket is read by lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list):
            if not rows:
                raise FluidError(f"{path}: no prompts in the file (an empty JSON array)")
            return [_prompt_of(row, f"{path}[{k}]") for k, row in enumerate(rows)]  # as the data files' rows
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise FluidError(f"{path}: no prompts in the file")
    if path.suffix != ".jsonl" and not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts: list[Prompt] = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FluidError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        prompts.append(_prompt_of(row, f"{path}:{n}"))
    return prompts


def _prompt_of(row: Any, where: str) -> Prompt:
    """The prompt of one JSON row: a string, a `messages` list of {role, content} strings, or a `PROMPT_FIELDS`
    string."""
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise FluidError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise FluidError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got "
                                 f"{json.dumps(message)[:60]}")
        return messages
    field = next((f for f in PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
    if field is None:
        raise FluidError(f"{where}: expected a 'messages' list or one of the string fields {', '.join(PROMPT_FIELDS)}")
    return row[field]


def check_no_mask_token(text: str, tokenizer: Any, mask_token: str | None, where: str) -> None:
    """User text that spells the model's mask token is refused: tokenized, it would become the mask id itself in
    a committed row, where the original model (which may not even have that id) never sees it, so verified output
    would no longer be the original model's. One rule for every prompt, whoever tokenizes it (generate, bench,
    the lm-eval adapter).

        >>> from fluid_cli.tokenizer import MASK, build_char_tokenizer
        >>> check_no_mask_token("a <|mask|> b", build_char_tokenizer(), MASK, "prompt 1")
        Traceback (most recent call last):
        fluid_cli.errors.FluidError: prompt 1 spells '<|mask|>', the model's mask token (the placeholder of its \
drafts), which a prompt cannot hold: remove or respell it
    """
    if mask_token and mask_token in text and mask_token in tokenizer.get_added_vocab():
        raise FluidError(f"{where} spells {mask_token!r}, the model's mask token (the placeholder of its drafts), "
                         "which a prompt cannot hold: remove or respell it")


def encode_prompt(tokenizer: Any, prompt: Prompt, chat_template: bool, mask_token: str | None = None,
                  where: str = "the prompt") -> list[int]:
    """Token ids of a prompt: through the chat template (as a user turn) when it is on and the tokenizer has one.
    A prompt spelling `mask_token` (the model's) is refused (`check_no_mask_token`)."""
    for text in [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]:
        check_no_mask_token(text, tokenizer, mask_token, where)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not (chat_template and has_template):
        raise FluidError("chat messages need the tokenizer's chat template (and --chat-template)")
    if chat_template and has_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def stop_strings(tokenizer: Any, stops: list[str]) -> StopCallback | None:
    """The decoder's stop callback for stop strings (kept in the output, as HF generate does).

    The decoder calls it after every token it appends; it returns the number of ids to keep once the text
    contains a stop string, else None. Only the last few tokens are decoded: a string of `n` UTF-8 bytes spans at
    most `n` tokens that each write at least one byte; the window is twice that plus two, for tokens that write
    nothing and for tokenizers that drop a leading space at the start of a decode. So the check costs the same
    at every length.

        >>> from fluid_cli.tokenizer import build_char_tokenizer
        >>> tok = build_char_tokenizer()
        >>> stop = stop_strings(tok, ["Question:"])
        >>> ids = tok.encode("12\\nQuestion: x")
        >>> next(n for n in range(1, len(ids) + 1) if stop(ids[:n]) is not None)  # checked token by token
        12
    """
    stops = [s for s in stops if s]
    if not stops:
        return None
    window = 2 * max(len(s.encode("utf-8")) for s in stops) + 2

    def stop(ids: list[int]) -> int | None:
        text = tokenizer.decode(ids[-window:], skip_special_tokens=False)
        return len(ids) if any(s in text for s in stops) else None

    return stop


def cut_at_stop(stop: StopCallback | None, ids: list[int]) -> list[int]:
    """`ids` cut where `stop` ends them, checked token by token as the decoder does: a reference decoded without
    the stop strings (transformers' greedy decoding) made comparable with the decoder's output.

        >>> from fluid_cli.tokenizer import build_char_tokenizer
        >>> tok = build_char_tokenizer()
        >>> tok.decode(cut_at_stop(stop_strings(tok, ["b"]), tok.encode("aabcb")))
        'aab'
    """
    if stop is not None:
        for n in range(1, len(ids) + 1):
            if (keep := stop(ids[:n])) is not None:
                return ids[:keep]
    return ids


class IncrementalText:
    """The text of generated ids that arrive a block at a time, handed out as it settles.

    The whole text is decoded each time and only the new characters are handed out, so tokens that merge across a
    block boundary (multi-byte characters, leading spaces) come out right; an unfinished character waits.

        >>> from fluid_cli.tokenizer import build_char_tokenizer
        >>> text = IncrementalText(build_char_tokenizer())
        >>> text.add(text.tokenizer.encode("ab", add_special_tokens=False)), text.add([]), text.rest()
        ('ab', '', '')
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # handed out so far

    def add(self, ids: list[int]) -> str | None:
        """The new text once `ids` are appended; None while a multi-byte character is incomplete."""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return None
        return self._advance(text)

    def rest(self) -> str:
        """All that is still held back (an incomplete character at the very end)."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        new, self.text = text[len(self.text):], text
        return new
