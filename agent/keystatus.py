"""What the reconciler knows of each key: its state, its failures and their backoff, the
conditions no ensure can fix, and what one pass did (``agent/reconcile.py`` runs the
passes, this module keeps their outcome).

A key is *pending* until a pass has looked at it, *in place* when its last ensure
succeeded, *drifted* when the kernel said it changed and no pass has repaired it yet,
*failing* when its last ensure or removal failed (tried again with exponential backoff).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
import structlog

from .bus import EventBus
from .errors import NetagentError

log = structlog.get_logger("netagent.reconcile")

IN_PLACE, PENDING, DRIFTED, FAILING = "in place", "pending", "drifted", "failing"
BACKOFF_MIN = 0.5
BACKOFF_MAX = 60.0
#: seconds one key's ensure or removal may take in all: every call it makes has a time
#: limit of its own, this is the net under them (a pass never waits forever)
STEP_TIMEOUT = 60.0


@dataclass(slots=True)
class KeyStatus:
    state: str = PENDING
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    #: when it was last seen in place (time.time())
    checked: float | None = None
    #: what last said it changed
    reason: str | None = None


@dataclass
class PassResult:
    actions: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def merge(self, key: str, actions: Iterable[str]) -> None:
        acts = list(actions)
        if acts:
            self.actions.setdefault(key, []).extend(acts)

    def only(self, keys: Iterable[str]) -> PassResult:
        wanted = set(keys)
        return PassResult(
            {k: v for k, v in self.actions.items() if k in wanted},
            {k: v for k, v in self.errors.items() if k in wanted},
        )


async def attempt(
    aw: Awaitable[list[str]], key: str | None = None
) -> tuple[list[str] | None, str | None, bool]:
    """Run one ensure/remove within STEP_TIMEOUT: (its actions, None, False), or (None,
    why it failed, whether it ran out of time). ``key``: whose step it is, for the log of
    an unexpected error."""
    try:
        with anyio.fail_after(STEP_TIMEOUT):
            return await aw, None, False
    except TimeoutError:
        return None, f"did not finish within {STEP_TIMEOUT:g} s", True
    except Exception as exc:
        return None, _why(exc, key), False


def attempt_now(
    fn: Callable[[], list[str]], key: str | None = None
) -> tuple[list[str] | None, str | None, bool]:
    """:func:`attempt` for a step that never waits (a file of /proc/sys read and
    written): a time limit could not stop it, so none is set up."""
    try:
        return fn(), None, False
    except Exception as exc:
        return None, _why(exc, key), False


def _why(exc: Exception, key: str | None) -> str:
    if isinstance(exc, NetagentError):
        return exc.message
    # the kernel said no (NetlinkError, OSError), or a bug
    if not isinstance(exc, OSError) and type(exc).__name__ != "NetlinkError":
        log.exception("unexpected failure", key=key)
    return f"{type(exc).__name__}: {exc}"


class Ticket:
    """A request's claim on the pass that covers its keys (``Reconciler.note``)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = frozenset(keys)
        self.done = anyio.Event()
        self.result = PassResult()


class StatusBook:
    """Each key's :class:`KeyStatus`, the failing keys' retry times and the conditions;
    what changes them publishes on the bus (``recovered``, ``error``, ``condition``,
    ``repaired``)."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.status: dict[str, KeyStatus] = {}
        #: key -> what keeps it from working that no ensure can fix (see ``condition``)
        self.conditions: dict[str, str] = {}
        #: failing keys -> when to try again (time.monotonic())
        self.retry: dict[str, float] = {}

    def failing(self) -> dict[str, str]:
        return {k: self.status[k].error or "failing" for k in self.retry if k in self.status}

    def is_failing(self, key: str) -> bool:
        st = self.status.get(key)
        return st is not None and st.state == FAILING

    def requested(self, key: str) -> None:
        """A request changed ``key``: pending, and no retry of the old one."""
        self.status[key] = KeyStatus(PENDING, None, 0, 0.0, None, "requested")
        if self.retry:
            self.retry.pop(key, None)

    def drifted(self, key: str, reason: str) -> None:
        """``key`` was in place and the kernel says it is not (a failing or pending key
        stays what it is)."""
        st = self.status.get(key)
        if st is not None and st.state == IN_PLACE:
            st.state, st.reason = DRIFTED, reason

    def forget(self, key: str) -> None:
        self.status.pop(key, None)
        self.retry.pop(key, None)

    def condition(self, key: str, reason: str | None) -> None:
        """Something outside the reconciler's reach keeps ``key`` from working (an empty
        namespace): not in place while it holds, whatever its ensure says."""
        if reason is None:
            self.conditions.pop(key, None)
        elif self.conditions.get(key) != reason:
            self.conditions[key] = reason
            self.bus.publish("condition", f"{key}: {reason}", key=key)

    def record(self, key: str, actions: list[str], result: PassResult) -> bool:
        """A step succeeded: True when it changed something."""
        result.merge(key, actions)
        self.ok(key)
        return bool(actions)

    def ok(self, key: str) -> None:
        # 10,000 forwards' verdicts in a pass: no call more (positional, no keywords: the
        # status costs half as much; a key that never failed has no retry to drop)
        st = self.status.get(key)
        if st is not None and st.state == FAILING:
            self.bus.publish("recovered", f"{key} is in place again", key=key)
        if self.retry:
            self.retry.pop(key, None)
        self.status[key] = KeyStatus(IN_PLACE, None, 0, 0.0, time.time())

    def fail(self, key: str, message: str, result: PassResult) -> bool:
        """Record a failure and when to try again (False: nothing changed)."""
        st = self.status.setdefault(key, KeyStatus())
        st.error = message
        st.failures += 1
        st.state = FAILING
        st.retry_at = time.monotonic() + min(
            BACKOFF_MAX, BACKOFF_MIN * math.pow(2, st.failures - 1)
        )
        self.retry[key] = st.retry_at
        result.errors[key] = message
        delay = st.retry_at - time.monotonic()
        self.bus.publish("error", f"{key}: {message} (retry in {delay:.1f}s)", key=key)
        return False

    def publish_repairs(self, trigger: str, result: PassResult, quiet: Iterable[str]) -> None:
        """What a pass no request asked for changed (``quiet``: keys not announced)."""
        skip = set(quiet)
        for key, actions in result.actions.items():
            if key in skip or not actions:
                continue
            self.bus.publish(
                "repaired",
                f"{key}: {'; '.join(actions)}",
                key=key,
                trigger=trigger,
                actions=actions,
            )
