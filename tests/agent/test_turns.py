"""Long loops take turns by time (``agent/turns.py``). No root."""

from __future__ import annotations

import time

from netagent.agent import turns
from netagent.agent.turns import Turns


def test_a_turn_is_due_once_a_slice_has_run_and_not_before() -> None:
    t = Turns()
    assert not t.due()  # just started
    deadline = time.perf_counter() + turns.SLICE
    while time.perf_counter() < deadline:
        pass
    assert t.due()
    assert not t.due()  # a new slice began with that turn
