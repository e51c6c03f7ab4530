"""Synthetic arithmetic word problems: the generation task of the embedded decoder families.

Each problem is one sentence pair such as "Maya has 12 pencils and buys 7 more. How many pencils does Maya have
now?" with an integer answer ("19"). They are generated, not read: every (template, name, object, a, b)
combination is enumerated in a fixed order, shuffled with NumPy seed :data:`SEED`, and cut into disjoint
train / validation / test splits, so a split is the same on every machine and no test problem is ever trained on.
Scored by greedy generation and exact match of the first integer (:data:`deltakit.families.lm.LM_TASKS`), in
the style of GSM8K (Cobbe et al., 2021, "Training Verifiers to Solve Math Word Problems") but one step deep, so
that a 135M-parameter model learns it in a hundred steps on a CPU.

Bump :data:`VERSION` whenever the generator changes: it is part of every decoder member's fingerprint.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

__all__ = ["SIZES", "SEED", "VERSION", "arith_frame", "arith_split"]

VERSION = 1
SEED = 0
#: Problems per split.
SIZES: dict[str, int] = {"train": 4000, "validation": 300, "test": 300}

_NAMES = ("Maya", "Sam", "Lena", "Omar", "Ivy", "Noah", "Zoe", "Ravi", "Ada", "Theo")
_OBJECTS = ("apples", "pencils", "stickers", "marbles", "books", "coins", "cards", "shells")
# (template, operation): {n} name, {o} object, {a} and {b} the numbers.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?", "+"),
    ("{n} had {a} {o} and found {b} more. How many {o} does {n} have?", "+"),
    ("{n} has {a} {o} and gives away {b}. How many {o} does {n} have left?", "-"),
    ("{n} had {a} {o} and lost {b} of them. How many {o} are left?", "-"),
)
_NUMBERS = range(2, 21)


def arith_frame() -> dict[str, list[str]]:
    """Every problem of the generator, shuffled: columns ``question`` and ``answer`` (an integer as text).

    Subtraction problems only use ``a >= b``, so every answer is a non-negative integer.
    """
    rows = []
    for (template, op), name, obj, a, b in itertools.product(_TEMPLATES, _NAMES, _OBJECTS, _NUMBERS, _NUMBERS):
        if op == "-" and b > a:
            continue
        rows.append((template.format(n=name, o=obj, a=a, b=b), str(a + b if op == "+" else a - b)))
    order = np.random.default_rng(SEED).permutation(len(rows))
    return {"question": [rows[i][0] for i in order], "answer": [rows[i][1] for i in order]}


def arith_split(split: str) -> datasets.Dataset:
    """One split of the arithmetic problems (columns ``question``, ``answer``); disjoint from the other splits.

    Raises:
        KeyError: If ``split`` is not one of :data:`SIZES` (the message lists them).
    """
    import datasets

    if split not in SIZES:
        raise KeyError(f"Unknown split {split!r}; available splits: {', '.join(SIZES)}.")
    frame = arith_frame()
    start = sum(SIZES[s] for s in list(SIZES)[: list(SIZES).index(split)])
    stop = start + SIZES[split]
    return datasets.Dataset.from_dict({k: v[start:stop] for k, v in frame.items()})
