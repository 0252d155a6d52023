"""Each key's status as the reconciler's passes leave it: failures back off and are
announced, a recovery is announced once, drift only from in place (no root)."""

from __future__ import annotations

import errno
import time

import anyio
import pytest

from netagent.agent import keystatus
from netagent.agent.bus import EventBus
from netagent.agent.errors import NameTaken
from netagent.agent.keystatus import (
    DRIFTED,
    FAILING,
    IN_PLACE,
    PENDING,
    PassResult,
    StatusBook,
    attempt,
    attempt_now,
)


def book() -> tuple[StatusBook, list[dict[str, object]]]:
    seen: list[dict[str, object]] = []
    return StatusBook(EventBus([seen.append])), seen


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    b, seen = book()
    result = PassResult()
    delays = []
    for _ in range(10):
        before = time.monotonic()
        assert b.fail("br/x", "no", result) is False
        delays.append(b.status["br/x"].retry_at - before)
    assert b.status["br/x"].state == FAILING and b.status["br/x"].failures == 10
    assert delays[0] == pytest.approx(keystatus.BACKOFF_MIN, abs=0.05)
    assert delays[1] == pytest.approx(2 * keystatus.BACKOFF_MIN, abs=0.05)
    assert delays[-1] == pytest.approx(keystatus.BACKOFF_MAX, abs=0.05)
    assert b.failing() == {"br/x": "no"} and result.errors == {"br/x": "no"}
    assert [e["type"] for e in seen] == ["error"] * 10


def test_a_recovery_is_announced_once_and_clears_the_retry() -> None:
    b, seen = book()
    b.fail("br/x", "no", PassResult())
    result = PassResult()
    assert b.record("br/x", ["created bridge x"], result) is True
    assert b.record("br/x", [], result) is False
    assert b.status["br/x"].state == IN_PLACE and b.failing() == {}
    assert [e["type"] for e in seen] == ["error", "recovered"]
    assert result.actions == {"br/x": ["created bridge x"]}


def test_drift_only_turns_an_in_place_key() -> None:
    b, _ = book()
    b.requested("br/a")
    b.drifted("br/a", "event")
    assert b.status["br/a"].state == PENDING
    b.ok("br/b")
    b.drifted("br/b", "link deleted")
    assert (b.status["br/b"].state, b.status["br/b"].reason) == (DRIFTED, "link deleted")
    b.fail("br/c", "no", PassResult())
    b.drifted("br/c", "event")
    assert b.is_failing("br/c")
    b.forget("br/c")
    assert "br/c" not in b.status and b.failing() == {}


def test_a_condition_is_announced_when_it_changes() -> None:
    b, seen = book()
    b.condition("plug/n/br", "the namespace is empty")
    b.condition("plug/n/br", "the namespace is empty")
    b.condition("plug/n/br", None)
    assert b.conditions == {} and [e["type"] for e in seen] == ["condition"]


async def test_attempt_says_why_a_step_failed_and_whether_it_ran_out_of_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def ok() -> list[str]:
        return ["did"]

    async def refused() -> list[str]:
        raise NameTaken("veth0 belongs to someone else")

    async def kernel() -> list[str]:
        raise OSError(errno.EBUSY, "busy")

    async def hangs() -> list[str]:
        await anyio.sleep(10)
        return []

    monkeypatch.setattr(keystatus, "STEP_TIMEOUT", 0.05)
    assert await attempt(ok()) == (["did"], None, False)
    assert await attempt(refused()) == (None, "veth0 belongs to someone else", False)
    assert await attempt(kernel()) == (None, "OSError: [Errno 16] busy", False)
    actions, why, timed_out = await attempt(hangs())
    assert actions is None and timed_out and "0.05 s" in (why or "")


def test_a_step_that_never_waits_says_why_it_failed_the_same_way() -> None:
    def refused() -> list[str]:
        raise NameTaken("veth0 belongs to someone else")

    def kernel() -> list[str]:
        raise OSError(errno.EACCES, "denied")

    assert attempt_now(lambda: ["enabled net.ipv4.ip_forward"]) == (
        ["enabled net.ipv4.ip_forward"],
        None,
        False,
    )
    assert attempt_now(refused) == (None, "veth0 belongs to someone else", False)
    assert attempt_now(kernel) == (None, "PermissionError: [Errno 13] denied", False)


def test_repairs_are_published_but_for_the_quiet_keys() -> None:
    b, seen = book()
    result = PassResult()
    result.merge("br/x", ["created bridge x"])
    result.merge("host", ["enabled net.ipv4.ip_forward"])
    b.publish_repairs("event", result, quiet=("host",))
    assert [(e["type"], e["key"]) for e in seen] == [("repaired", "br/x")]
