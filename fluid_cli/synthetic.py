"""`synthetic:arithmetic`: short grade-school word problems with step-by-step solutions, in GSM8K's layout.

The demo and the tests need instruction data without any download, and a model small enough to grow from scratch
on a CPU must be able to learn it. So the problems are short, use small numbers (1-2 digit addition and
subtraction, multiplication and exact division by a single digit, every result under 1000), and come from a
dozen templates whose solutions restate the question in fixed phrases. That mix is what FLUID's elastic
horizons exploit: the restated text is highly predictable, the computed numbers are not.

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

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Finn", "Gia", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Nora",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vik", "Zoe"]
THINGS = ["apples", "marbles", "stickers", "cookies", "pencils", "cards", "shells", "books", "eggs", "toy cars"]
ITEMS = ["pen", "cap", "ball", "book", "kite", "mug", "hat", "toy", "comb", "bag"]
VEHICLES = ["car", "bus", "train", "truck", "boat"]

# A template draws its numbers from `rng` and returns (question, solution lines, result).
Template = Callable[[random.Random], tuple[str, list[str], int]]


def _collect(rng: random.Random) -> tuple[str, list[str], int]:
    n, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    question = (f"{n} collects {a} {thing} in the morning and {b} {thing} in the afternoon. "
                f"How many {thing} does {n} collect in all?")
    steps = [f"In the morning {n} collects {a} {thing}.", f"{n} collects {a} + {b} = {a + b} {thing} in all."]
    return question, steps, a + b


def _shopping_total(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    item, item2 = rng.sample(ITEMS, 2)
    a, p, q = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    question = f"{n} buys {a} {item}s for ${p} each and a {item2} for ${q}. How much money does {n} spend in all?"
    steps = [f"The {item}s cost {a} * {p} = {a * p} dollars.",
             f"In all {n} spends {a * p} + {q} = {a * p + q} dollars."]
    return question, steps, a * p + q


def _change(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    item, item2 = rng.sample(ITEMS, 2)
    p, q, left = rng.randint(1, 30), rng.randint(1, 30), rng.randint(0, 40)
    m = p + q + left
    question = f"{n} has ${m}. {n} buys a {item} for ${p} and a {item2} for ${q}. How much money does {n} have left?"
    steps = [f"{n} spends {p} + {q} = {p + q} dollars.", f"{n} has {m} - {p + q} = {left} dollars left."]
    return question, steps, left


def _give_and_find(rng: random.Random) -> tuple[str, list[str], int]:
    n, f = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a = rng.randint(10, 60)
    b, c = rng.randint(1, a), rng.randint(1, 30)
    question = (f"{n} has {a} {thing}. {n} gives {b} {thing} to {f} and then finds {c} more. "
                f"How many {thing} does {n} have now?")
    steps = [f"After giving {b} away, {n} has {a} - {b} = {a - b} {thing}.",
             f"Then {n} has {a - b} + {c} = {a - b + c} {thing}."]
    return question, steps, a - b + c


def _ages(rng: random.Random) -> tuple[str, list[str], int]:
    n, f = rng.sample(NAMES, 2)
    a, b, c = rng.randint(3, 40), rng.randint(1, 30), rng.randint(1, 20)
    question = f"{n} is {a} years old. {f} is {b} years older than {n}. How old will {f} be in {c} years?"
    steps = [f"{f} is {a} + {b} = {a + b} years old now.",
             f"In {c} years {f} will be {a + b} + {c} = {a + b + c} years old."]
    return question, steps, a + b + c


def _speed(rng: random.Random) -> tuple[str, list[str], int]:
    vehicle = rng.choice(VEHICLES)
    v, t, w = 10 * rng.randint(1, 9), rng.randint(2, 5), rng.randint(1, 30)
    question = (f"A {vehicle} goes {v} miles per hour for {t} hours and then {w} more miles. "
                f"How many miles does the {vehicle} go?")
    steps = [f"In {t} hours the {vehicle} goes {v} * {t} = {v * t} miles.",
             f"In all the {vehicle} goes {v * t} + {w} = {v * t + w} miles."]
    return question, steps, v * t + w


def _boxes(rng: random.Random) -> tuple[str, list[str], int]:
    n, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    question = (f"There are {a} boxes with {b} {thing} in each box. {n} takes out {c} {thing}. "
                f"How many {thing} are left?")
    steps = [f"The boxes hold {a} * {b} = {a * b} {thing}.",
             f"After {n} takes {c}, there are {a * b} - {c} = {a * b - c} {thing} left."]
    return question, steps, a * b - c


def _reading(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    a, b, left = rng.randint(5, 40), rng.randint(5, 40), rng.randint(1, 60)
    c = a + b + left
    question = (f"{n}'s book has {c} pages. {n} reads {a} pages on Monday and {b} pages on Tuesday. "
                "How many pages are left?")
    steps = [f"{n} reads {a} + {b} = {a + b} pages.", f"There are {c} - {a + b} = {left} pages left."]
    return question, steps, left


def _savings(rng: random.Random) -> tuple[str, list[str], int]:
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, w = rng.randint(2, 9), rng.randint(2, 9)
    b = rng.randint(1, a * w)
    question = (f"{n} saves ${a} every week for {w} weeks. Then {n} spends ${b} on a {item}. "
                f"How much money does {n} have left?")
    steps = [f"{n} saves {a} * {w} = {a * w} dollars.",
             f"After buying the {item}, {n} has {a * w} - {b} = {a * w - b} dollars."]
    return question, steps, a * w - b


def _class(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(5, 20), rng.randint(5, 20)
    c = rng.randint(1, 9)
    question = (f"A class has {a} boys and {b} girls. {c} students are absent today. "
                "How many students are in class today?")
    steps = [f"The class has {a} + {b} = {a + b} students.",
             f"Today {a + b} - {c} = {a + b - c} students are in class."]
    return question, steps, a + b - c


def _sharing(rng: random.Random) -> tuple[str, list[str], int]:
    n, thing = rng.choice(NAMES), rng.choice(THINGS)
    k, each = rng.randint(2, 9), rng.randint(2, 9)
    total = k * each
    a = rng.randint(1, total - 1)
    question = (f"{n} has {a} {thing} and gets {total - a} more. {n} shares them equally among {k} friends. "
                "How many does each friend get?")
    steps = [f"{n} has {a} + {total - a} = {total} {thing}.", f"Each friend gets {total} / {k} = {each} {thing}."]
    return question, steps, each


def _garden(rng: random.Random) -> tuple[str, list[str], int]:
    n = rng.choice(NAMES)
    rows, per = rng.randint(2, 9), rng.randint(2, 9)
    plants = rows * per
    dead, extra = rng.randint(1, min(9, plants - 1)), rng.randint(1, 20)
    question = (f"{n} plants {rows} rows of flowers with {per} flowers in each row. {dead} flowers die and {n} "
                f"plants {extra} new ones. How many flowers are there now?")
    steps = [f"{n} plants {rows} * {per} = {plants} flowers.",
             f"After {dead} die, there are {plants} - {dead} = {plants - dead}.",
             f"With the new ones there are {plants - dead} + {extra} = {plants - dead + extra} flowers."]
    return question, steps, plants - dead + extra


TEMPLATES: list[Template] = [_collect, _shopping_total, _change, _give_and_find, _ages, _speed, _boxes, _reading,
                             _savings, _class, _sharing, _garden]


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """`n` word problems with GSM8K's columns (`question`, `answer` ending in `#### <integer>`), seeded."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, steps, result = rng.choice(TEMPLATES)(rng)
        rows.append({"question": question, "answer": "\n".join([*steps, f"#### {result}"])})
    return rows
