"""The built-in `synthetic:arithmetic` source: GSM8K layout, correct arithmetic, seeded, short and small."""

from __future__ import annotations

import re

from fluid_cli.synthetic import NAMES, TEMPLATES, arithmetic_rows

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}

ROWS = arithmetic_rows(2000, seed=0)


def test_every_equation_is_right_and_the_last_one_is_the_answer():
    for row in ROWS:
        *steps, final = row["answer"].split("\n")
        assert re.fullmatch(r"#### \d+", final), row
        equations = [EQUATION.search(step) for step in steps if "=" in step]
        assert equations and all(equations), row
        for eq in equations:
            a, op, b, c = eq.groups()
            assert OPS[op](int(a), int(b)) == int(c), (eq.group(0), row)
        assert equations[-1].group(4) == final.removeprefix("#### ")
        # Each computed value feeds the next step, as a chained solution should (2000 rows, all templates).
        for prev, nxt in zip(equations, equations[1:]):
            assert prev.group(4) in (nxt.group(1), nxt.group(3)), row


def test_short_small_and_learnable():
    for row in ROWS:
        assert 60 <= len(row["question"]) <= 200, row["question"]
        assert 40 <= len(row["answer"]) <= 200, row["answer"]
        numbers = [int(n) for n in re.findall(r"\d+", row["question"] + row["answer"])]
        assert min(numbers) >= 0
        assert max(numbers) < 30, row  # a few hundred arithmetic facts, learnable by a tiny model
        for a, op, b, c in EQUATION.findall(row["answer"]):
            assert op in "+-", row
            assert min(int(a), int(b), int(c)) < 10, row  # every step involves a single digit
        # Copy-friendly: the first step restates a fact of the question (its numbers) before any computing.
        first = row["answer"].split("\n")[0]
        assert "=" not in first and set(re.findall(r"\d+", first)) <= set(re.findall(r"\d+", row["question"])), row
        # A name never starts a solution line, so BPE spells it as in the question (" Ava", not "Ava").
        assert not {line.split(" ")[0] for line in row["answer"].split("\n")} & set(NAMES), row
        assert row["question"].endswith("?") and row["question"].isascii() and row["answer"].isascii()
    # Every template appears, and the problems are not repeats of a few.
    assert len({r["question"] for r in ROWS}) > 0.95 * len(ROWS)
    first_words = {r["answer"].split(" ")[0] for r in ROWS}
    assert len(first_words) > len(TEMPLATES) // 2


def test_seeded_and_deterministic():
    assert arithmetic_rows(50, seed=3) == arithmetic_rows(50, seed=3)
    assert arithmetic_rows(50, seed=3) != arithmetic_rows(50, seed=4)
    assert arithmetic_rows(10, seed=3) == arithmetic_rows(50, seed=3)[:10]  # a prefix of a longer run
    assert arithmetic_rows(0, seed=0) == []
