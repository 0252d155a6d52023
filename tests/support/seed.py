"""The seed of a random test: drawn fresh each run, or ``NETAGENT_TEST_SEED`` to replay.

Tests get it from the ``rng_seed`` fixture (``tests/conftest.py``), which prints it when
the test starts and adds it to the test's failure report."""

from __future__ import annotations

import os
import random

ENV = "NETAGENT_TEST_SEED"


def draw_seed() -> int:
    """``NETAGENT_TEST_SEED`` when set (an int), else a fresh random seed."""
    given = os.environ.get(ENV, "").strip()
    if given:
        try:
            return int(given, 0)
        except ValueError:
            raise ValueError(f"{ENV}={given!r} is not an integer") from None
    return random.SystemRandom().randrange(1 << 30)


def replay_hint(seed: int) -> str:
    return f"seed {seed}; replay with {ENV}={seed}"
