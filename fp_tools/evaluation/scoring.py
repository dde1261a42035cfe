"""Exact scoring of generated answers (RULER's string-match metrics, on whole words).

An answer counts as found when it occurs in the prediction, case-insensitively, not glued to other
letters or digits: ``"1234567"`` is found in ``"is 1234567."`` but not in ``"12345678"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("all", "any")


def found(prediction: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``prediction`` as a whole word/number (case-insensitive)."""
    answer = answer.strip()
    if not answer:
        raise ValueError("an expected answer must not be empty")
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, prediction.lower()) is not None


def score(prediction: str, answers: Sequence[str], metric: str = "all") -> float:
    """Score in [0, 1]: ``"all"`` = fraction of ``answers`` found; ``"any"`` = 1.0 if one is found."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not answers:
        raise ValueError("a case needs at least one expected answer")
    hits = [found(prediction, a) for a in answers]
    return float(any(hits)) if metric == "any" else sum(hits) / len(hits)
