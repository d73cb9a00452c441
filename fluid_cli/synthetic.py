"""`synthetic:arithmetic`: short grade-school word problems with step-by-step solutions, in GSM8K's layout.

The demo and the tests need instruction data without any download, and a model small enough to grow from scratch
on a CPU in minutes must be able to learn it. So the arithmetic is small: each solution adds two digits, then adds
or takes away one more number, so every result is under 30 and the model has a few hundred facts to learn, not
thousands. The solutions are copy-friendly: each step first restates a fact of the question word for word
("At first Ava has 7 apples.") and then computes. A name never starts a line, so a byte-level BPE spells it with
the same token (" Ava") in the question and in the solution, and copying it is exact. That mix is what FLUID's
elastic horizons exploit: the restated text is highly predictable, the computed numbers are not.

Each row has GSM8K's columns: `question`, and `answer` = the solution steps, one per line, then `#### <integer>`.

    >>> rows = arithmetic_rows(2, seed=0)
    >>> sorted(rows[0])
    ['answer', 'question']
    >>> rows[0]["answer"].splitlines()[-1].startswith("#### ")
    True
    >>> arithmetic_rows(2, seed=0) == rows
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ["Ava", "Ben", "Dan", "Leo", "Mia", "Sara", "Tom", "Zoe"]
THINGS = ["apples", "marbles", "stickers", "cookies", "pencils", "cards"]
ITEMS = ["pen", "cap", "ball", "kite", "mug", "hat"]

# A template draws its numbers from `rng` and returns (question, solution lines, result).
Template = Callable[[random.Random], tuple[str, list[str], int]]


def _digits(rng: random.Random) -> tuple[int, int]:
    return rng.randint(1, 9), rng.randint(1, 9)


def _collect(rng: random.Random) -> tuple[str, list[str], int]:
    n, f = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b = _digits(rng)
    c = rng.randint(1, min(9, a + b))
    question = (f"{n} collects {a} {thing} in the morning and {b} {thing} in the afternoon. "
                f"Then {n} gives {c} {thing} to {f}. How many {thing} does {n} have now?")
    steps = [f"In the morning {n} collects {a} {thing}.", f"In the afternoon {n} collects {b} {thing}.",
             f"So {n} collects {a} + {b} = {a + b} {thing}.",
             f"After giving {c} {thing} to {f}, {n} has {a + b} - {c} = {a + b - c} {thing}."]
    return question, steps, a + b - c


def _find_and_give(rng: random.Random) -> tuple[str, list[str], int]:
    n, f = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b = _digits(rng)
    c = rng.randint(1, min(9, a + b))
    question = (f"{n} has {a} {thing}. {n} finds {b} more {thing} and then gives {c} {thing} to {f}. "
                f"How many {thing} does {n} have now?")
    steps = [f"At first {n} has {a} {thing}.", f"After finding {b} more, {n} has {a} + {b} = {a + b} {thing}.",
             f"After giving {c} {thing} to {f}, {n} has {a + b} - {c} = {a + b - c} {thing}."]
    return question, steps, a + b - c


def _ages(rng: random.Random) -> tuple[str, list[str], int]:
    n, f = rng.sample(NAMES, 2)
    a, b = _digits(rng)
    c = rng.randint(1, 9)
    question = f"{n} is {a} years old. {f} is {b} years older than {n}. How old will {f} be in {c} years?"
    steps = [f"Now {n} is {a} years old.", f"So {f} is {a} + {b} = {a + b} years old.",
             f"In {c} years {f} will be {a + b} + {c} = {a + b + c} years old."]
    return question, steps, a + b + c


def _change(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    item, item2 = rng.sample(ITEMS, 2)
    p, q = _digits(rng)
    left = rng.randint(0, 9)
    m = p + q + left
    question = f"{n} has ${m}. {n} buys a {item} for ${p} and a {item2} for ${q}. How much money does {n} have left?"
    steps = [f"At first {n} has {m} dollars.", f"The {item} and the {item2} cost {p} + {q} = {p + q} dollars.",
             f"So {n} has {m} - {p + q} = {left} dollars left."]
    return question, steps, left


def _reading(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    a, b = _digits(rng)
    left = rng.randint(1, 9)
    c = a + b + left
    question = (f"{n}'s book has {c} pages. {n} reads {a} pages on Monday and {b} pages on Tuesday. "
                "How many pages are left?")
    steps = [f"The book has {c} pages.", f"Together {n} reads {a} + {b} = {a + b} pages.",
             f"So there are {c} - {a + b} = {left} pages left."]
    return question, steps, left


def _class(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    a, b = _digits(rng)
    c = rng.randint(1, min(9, a + b))
    question = (f"The class of {n} has {a} boys and {b} girls. {c} students are absent today. "
                "How many students are in class today?")
    steps = [f"The class of {n} has {a} boys and {b} girls.", f"So the class has {a} + {b} = {a + b} students.",
             f"With {c} students absent, {a + b} - {c} = {a + b - c} students are in class today."]
    return question, steps, a + b - c


TEMPLATES: list[Template] = [_collect, _find_and_give, _ages, _change, _reading, _class]


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """`n` word problems with GSM8K's columns (`question`, `answer` ending in `#### <integer>`), seeded."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, steps, result = rng.choice(TEMPLATES)(rng)
        rows.append({"question": question, "answer": "\n".join([*steps, f"#### {result}"])})
    return rows
