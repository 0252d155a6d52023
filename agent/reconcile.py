"""The reconciler: observe, plan, apply; level-triggered.

Requests and kernel events only say *which keys* may differ from the desired state
(``kick``); a pass realizes those keys through the backends, each ensure observing first
and acting only on the difference, and logs one line. A periodic full pass, and one after
lost events or a failure, covers everything. Keys that keep failing back off
exponentially instead of spinning.

Requests realize their own changes under ``lock`` before they are answered, so
``ctl plug`` returns once the namespace is plugged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from netagent.backends.firewall import AnyBackend, FirewallSpec
from netagent.backends.netlink import NetlinkBackend, ensure_forwarding

from . import intents as I
from .bus import EventBus
from .errors import NetagentError
from .state import Change, DesiredState

log = structlog.get_logger("netagent.reconcile")

FIREWALL_KEY = "firewall"
BACKOFF_MIN = 0.5
BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    master: int | None
    up: bool
    peer: int | None = None
    owner: str | None = None  # the netagent key it belongs to, if any


@dataclass
class KeyStatus:
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0


@dataclass
class PassResult:
    actions: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def merge(self, key: str, actions: Iterable[str]) -> None:
        acts = list(actions)
        if acts:
            self.actions.setdefault(key, []).extend(acts)


def _order(key: str) -> int:
    kind = key.split("/", 1)[0]
    return I.KIND_ORDER.index(kind) if kind in I.KIND_ORDER else len(I.KIND_ORDER)


class Reconciler:
    def __init__(
        self,
        desired: DesiredState,
        links: NetlinkBackend,
        firewall: AnyBackend,
        bus: EventBus,
        resync_interval: float = 30.0,
    ) -> None:
        self.desired = desired
        self.links = links
        self.firewall = firewall
        self.bus = bus
        self.resync_interval = resync_interval
        self.lock = anyio.Lock()
        self.status: dict[str, KeyStatus] = {}
        self.dirty: set[str] = set()
        self.full_requested = True
        self._wake = anyio.Event()
        self.passes = 0
        self.last_pass: dict[str, Any] = {}
        self.conntrack = True
        self.conntrack_pending: list[I.Forward] = []
        #: removals that failed, retried until they succeed (or the key is wanted again)
        self.removals: dict[str, I.Intent] = {}
        self._conntrack_wake = anyio.Event()
        #: the event source's view of the host's links (kept by events, no dump needed)
        self.link_view: Callable[[], list[LinkInfo]] | None = None

    # ---- triggers -------------------------------------------------------------------
    def kick(self, keys: Iterable[str] = (), full: bool = False) -> None:
        self.dirty.update(keys)
        if full:
            self.full_requested = True
        self._wake.set()

    def firewall_spec(self) -> FirewallSpec:
        return FirewallSpec(
            forwards=tuple(self.desired.of_kind(I.Forward)),
            bridges=tuple(self.desired.of_kind(I.Bridge)),
        )

    # ---- realizing one key ----------------------------------------------------------
    async def _ensure(
        self, intent: I.Intent, old: I.Intent | None, dry_run: bool = False
    ) -> list[str]:
        if isinstance(intent, I.Namespace):
            return await self.links.ensure_namespace(intent, dry_run=dry_run)
        if isinstance(intent, I.Bridge):
            assert old is None or isinstance(old, I.Bridge)
            return await self.links.ensure_bridge(intent, old, dry_run=dry_run)
        if isinstance(intent, I.Plug):
            br = self.desired.bridge(intent.bridge)
            assert br is not None
            return await self.links.ensure_plug(intent, br, dry_run=dry_run)
        if isinstance(intent, I.Wire):
            return await self.links.ensure_wire(intent, dry_run=dry_run)
        if isinstance(intent, I.AttachRule):
            if dry_run:
                return []
            return await self.attach_existing(intent)
        return []  # forwards are the firewall's, handled as a whole

    async def _remove(self, intent: I.Intent) -> list[str]:
        if isinstance(intent, I.Namespace):
            return await self.links.remove_namespace(intent)
        if isinstance(intent, I.Bridge):
            return await self.links.remove_bridge(intent)
        if isinstance(intent, I.Plug):
            done = await self.links.remove_plug(intent)
            await self.forget_unused(intent.ns)
            return done
        if isinstance(intent, I.Wire):
            done = await self.links.remove_wire(intent)
            await self.forget_unused(intent.ns_a)
            await self.forget_unused(intent.ns_b)
            return done
        return []

    async def forget_unused(self, ns: str) -> None:
        """Close the socket kept in a namespace nothing of netagent's uses any more: an
        open socket keeps a deleted namespace alive in the kernel."""
        if f"ns/{ns}" not in self.desired.intents and not self.desired.users_of_namespace(ns):
            await self.links.forget_namespace(ns)

    async def inspect(self, intent: I.Intent) -> list[str]:
        """What is missing for ``intent`` (empty: in place)."""
        try:
            return await self._ensure(intent, None, dry_run=True)
        except NetagentError as exc:
            return [exc.message]
        except Exception as exc:
            return [f"cannot check: {exc}"]

    # ---- attach rules ---------------------------------------------------------------
    def rule_for(self, ifname: str) -> I.AttachRule | None:
        if ifname == "lo":
            return None  # a rule like '*' must not try to enslave the loopback
        for rule in self.desired.of_kind(I.AttachRule):
            if rule.matches(ifname):
                return rule
        return None

    async def attach_existing(self, rule: I.AttachRule) -> list[str]:
        """Attach what already exists and matches (a new rule, a start, a resync)."""
        if self.link_view is not None:
            links = self.link_view()
        else:
            links = [
                LinkInfo(lk.index, lk.name, lk.kind, lk.master, lk.up, lk.peer, lk.owner_key)
                for lk in await self.links.links()
            ]
        by_name = {lk.name: lk for lk in links}
        names = {lk.index: lk.name for lk in links}
        bridge = by_name.get(rule.bridge)
        if bridge is None:
            return []
        done = []
        on_bridge = {lk.index for lk in links if lk.master == bridge.index}
        for lk in links:
            skip = lk.index == bridge.index or lk.kind == "bridge" or lk.owner is not None
            if skip or self.rule_for(lk.name) != rule:
                continue  # bridges and what netagent made itself are never attached
            if lk.peer is not None and lk.peer in on_bridge and lk.index not in on_bridge:
                self.bus.publish(
                    "left-alone",
                    f"{lk.name} matches {rule.pattern!r}, but its veth peer "
                    f"{names.get(lk.peer)} is on {rule.bridge} already: both ends on one "
                    "bridge would make a loop",
                    ifname=lk.name,
                    bridge=rule.bridge,
                )
                continue
            on_bridge.add(lk.index)
            try:
                done.extend(
                    await self.attach(
                        lk.index,
                        lk.name,
                        lk.master,
                        lk.up,
                        bridge.index,
                        rule,
                        master_name=names.get(lk.master) if lk.master else None,
                    )
                )
            except OSError as exc:  # vanished meanwhile, or the bridge is full
                done.append(f"could not attach {lk.name}: {exc.strerror or exc}")
        return done

    async def attach(
        self,
        index: int,
        name: str,
        master: int | None,
        up: bool,
        bridge_index: int,
        rule: I.AttachRule,
        master_name: str | None = None,
    ) -> list[str]:
        if master == bridge_index and up:
            return []
        if master not in (None, 0, bridge_index):
            other = master_name or f"interface #{master}"
            self.bus.publish(
                "left-alone",
                f"{name} matches {rule.pattern!r} but is already enslaved to {other}; "
                "netagent does not take it",
                ifname=name,
                bridge=rule.bridge,
                master=other,
            )
            return [f"left {name} alone: it belongs to {other}"]
        await self.links.enslave(index, bridge_index)
        self.bus.publish(
            "attached",
            f"{name} attached to {rule.bridge} (rule {rule.pattern!r})",
            ifname=name,
            bridge=rule.bridge,
            rule=rule.key,
        )
        return [f"attached {name} to {rule.bridge}"]

    # ---- passes ---------------------------------------------------------------------
    async def realize(self, changes: list[Change]) -> PassResult:
        """Realize the changes a request just made (called with ``lock`` held)."""
        t0 = time.perf_counter()
        result = PassResult()
        removals = sorted((c for c in changes if c.new is None), key=lambda c: -_order(c.key))
        updates = sorted((c for c in changes if c.new is not None), key=lambda c: _order(c.key))
        fwd_added = [c.new for c in changes if isinstance(c.new, I.Forward)]
        fwd_removed = [c.old for c in changes if isinstance(c.old, I.Forward)]
        bridges_changed = any(isinstance(c.new or c.old, I.Bridge) for c in changes)
        # the firewall first on removal (stop forwarding before the target goes away)
        if fwd_removed or fwd_added or bridges_changed:
            await self._firewall_update(fwd_added, fwd_removed, bridges_changed, result)
        for c in removals:
            assert c.old is not None
            await self._step(c.key, self._remove(c.old), result)
            if c.key in result.errors:
                self.removals[c.key] = c.old  # retried with backoff until it is gone
            else:
                self.status.pop(c.key, None)
        for c in updates:
            assert c.new is not None
            if isinstance(c.new, I.Forward):
                continue
            await self._step(c.key, self._ensure(c.new, c.old), result)
            if isinstance(c.new, I.Bridge) and isinstance(c.old, I.Bridge):
                # a new gateway address gives the plugs on the bridge their default route
                for plug in self.desired.plugs_on(c.new.name):
                    await self._step(plug.key, self._ensure(plug, None), result)
        await self._step("sysctl", self._forwarding(), result)
        self._log_pass("request", t0, result, len(changes))
        return result

    async def _firewall_update(
        self,
        added: list[I.Forward],
        removed: list[I.Forward],
        full: bool,
        result: PassResult,
    ) -> None:
        spec = self.firewall_spec()
        try:
            empty = not spec.forwards and not spec.bridges
            if full or empty or self.status.get(FIREWALL_KEY, KeyStatus()).error:
                await self._firewall_full(spec, result)
            else:
                batch = self.firewall.plan_update(spec, added, removed)
                try:
                    await self.firewall.apply(batch)
                    result.merge(FIREWALL_KEY, batch.steps)
                except NetagentError:
                    # the table drifted under us: observe and converge the whole of it
                    await self._firewall_full(spec, result)
            self._ok(FIREWALL_KEY)
        except NetagentError as exc:
            self._fail(FIREWALL_KEY, exc.message, result)
        # retargeted or removed forwards must not keep their old flows; the conntrack
        # tool takes ~20 ms, so the background loop runs it right after the reply
        if removed and self.conntrack:
            self.conntrack_pending.extend(removed)
            self._conntrack_wake.set()

    async def _firewall_full(self, spec: FirewallSpec, result: PassResult) -> None:
        if not spec.forwards and not spec.bridges:
            # nothing to do: the firewall holds nothing of netagent's (after a purge,
            # an empty table or empty chains would be something left behind)
            result.merge(FIREWALL_KEY, await self.firewall.purge())
            return
        observed = await self.firewall.observe()
        batch = self.firewall.plan(spec, observed)
        await self.firewall.apply(batch)
        result.merge(FIREWALL_KEY, batch.steps)

    async def _forwarding(self) -> list[str]:
        need4 = need6 = False
        for br in self.desired.of_kind(I.Bridge):
            need4 |= any(a.version == 4 for a in br.addresses)
            need6 |= any(a.version == 6 for a in br.addresses)
        families = self.desired.forward_families()
        return ensure_forwarding(need4 or 4 in families, need6 or 6 in families)

    async def _step(self, key: str, coro: Any, result: PassResult) -> None:
        try:
            actions = await coro
            result.merge(key, actions)
            self._ok(key)
        except NetagentError as exc:
            self._fail(key, exc.message, result)
        except OSError as exc:
            self._fail(key, f"{type(exc).__name__}: {exc}", result)
        except Exception as exc:  # the kernel said no (NetlinkError) or a bug; never crash
            self._fail(key, f"{type(exc).__name__}: {exc}", result)

    def _ok(self, key: str) -> None:
        st = self.status.get(key)
        if st is not None and st.error is not None:
            self.bus.publish("recovered", f"{key} is in place again", key=key)
        self.status[key] = KeyStatus()

    def _fail(self, key: str, message: str, result: PassResult) -> None:
        self._wake.set()  # the loop must learn when to retry
        st = self.status.setdefault(key, KeyStatus())
        st.failures += 1
        st.error = message
        delay = min(BACKOFF_MAX, BACKOFF_MIN * math.pow(2, st.failures - 1))
        st.retry_at = time.monotonic() + delay
        result.errors[key] = message
        self.bus.publish("error", f"{key}: {message} (retry in {delay:.1f}s)", key=key)

    def _log_pass(self, trigger: str, t0: float, result: PassResult, keys: int) -> None:
        self.passes += 1
        ms = (time.perf_counter() - t0) * 1000
        self.last_pass = {
            "trigger": trigger,
            "keys": keys,
            "changed": sum(len(a) for a in result.actions.values()),
            "errors": len(result.errors),
            "ms": round(ms, 2),
            "at": time.time(),
        }
        log.info(
            "reconcile pass",
            trigger=trigger,
            keys=keys,
            changed=self.last_pass["changed"],
            errors=result.errors or None,
            duration_ms=round(ms, 2),
        )

    async def _ensure_current(self, key: str, result: PassResult) -> I.Intent | None:
        """Ensure one key as the desired state has it *now*, under the lock, so a
        request that changed or removed it meanwhile wins. Background passes take the
        lock per key: requests wait for one key, never for a whole pass."""
        async with self.lock:
            if key == "sysctl":
                await self._step("sysctl", self._forwarding(), result)
                return None
            intent = self.desired.get(key)
            if intent is None:
                gone = self.removals.pop(key, None)
                if gone is not None:
                    await self._step(key, self._remove(gone), result)
                    if key in result.errors:
                        self.removals[key] = gone
                        return None
                self.status.pop(key, None)
                return None
            self.removals.pop(key, None)  # wanted again
            if isinstance(intent, I.Forward):
                return None
            await self._step(key, self._ensure(intent, None), result)
            return intent

    async def _firewall_pass(self, result: PassResult) -> None:
        async with self.lock:
            try:
                await self._firewall_full(self.firewall_spec(), result)
                self._ok(FIREWALL_KEY)
            except NetagentError as exc:
                self._fail(FIREWALL_KEY, exc.message, result)
            except Exception as exc:  # EMFILE spawning nft and the like: retry, never die
                self._fail(FIREWALL_KEY, f"{type(exc).__name__}: {exc}", result)

    async def full_pass(self, trigger: str) -> PassResult:
        """Converge everything: every intent, the whole firewall, sysctls."""
        t0 = time.perf_counter()
        result = PassResult()
        keys = sorted(self.desired.intents, key=_order)
        for key in [*sorted(self.removals, key=lambda k: -_order(k)), *keys]:
            await self._ensure_current(key, result)
        await self._firewall_pass(result)
        async with self.lock:
            await self._step("sysctl", self._forwarding(), result)
        self._publish_repairs(trigger, result)
        self._log_pass(trigger, t0, result, len(keys))
        return result

    def _prerequisites(self, keys: set[str]) -> set[str]:
        """A plug needs its namespace and bridge, a wire its two namespaces: a repair of
        the one brings back the others first (a deleted namespace is recreated, then
        re-plugged)."""
        out = set(keys)
        for key in keys:
            intent = self.desired.get(key)
            needs: list[str] = []
            if isinstance(intent, I.Plug):
                needs = [f"ns/{intent.ns}", f"br/{intent.bridge}"]
            elif isinstance(intent, I.Wire):
                needs = [f"ns/{intent.ns_a}", f"ns/{intent.ns_b}"]
            out.update(k for k in needs if k in self.desired.intents)
        return out

    async def keys_pass(self, keys: set[str], trigger: str) -> PassResult:
        t0 = time.perf_counter()
        result = PassResult()
        for key in sorted(self._prerequisites(keys), key=_order):
            if key == FIREWALL_KEY:
                await self._firewall_pass(result)
                continue
            intent = await self._ensure_current(key, result)
            # what hangs off a repaired bridge or namespace comes back with it
            if isinstance(intent, (I.Bridge, I.Namespace)) and result.actions.get(key):
                for dep in self._dependents(intent):
                    await self._ensure_current(dep.key, result)
        self._publish_repairs(trigger, result)
        self._log_pass(trigger, t0, result, len(keys))
        return result

    def _dependents(self, intent: I.Intent) -> list[I.Intent]:
        if isinstance(intent, I.Bridge):
            return list(self.desired.users_of_bridge(intent.name))
        if isinstance(intent, I.Namespace):
            return self.desired.users_of_namespace(intent.name)
        return []

    def _publish_repairs(self, trigger: str, result: PassResult) -> None:
        for key, actions in result.actions.items():
            if key == "sysctl" or not actions:
                continue
            self.bus.publish(
                "repaired",
                f"{key}: {'; '.join(actions)}",
                key=key,
                trigger=trigger,
                actions=actions,
            )

    async def run(self) -> None:
        """The background loop: coalesce kicks, run passes, back off failing keys."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._conntrack_worker)
            await self._loop()

    async def _conntrack_worker(self) -> None:
        """Clears the tracked connections of removed forwards, beside the loop: 50
        removals in a row cost ~1 s of conntrack runs, which must not delay repairs."""
        while True:
            await self._conntrack_wake.wait()
            self._conntrack_wake = anyio.Event()
            while self.conntrack_pending:
                forwards, self.conntrack_pending = self.conntrack_pending, []
                await clear_conntrack(forwards)

    async def _loop(self) -> None:
        next_full = time.monotonic() + self.resync_interval
        while True:
            now = time.monotonic()
            retry = [k for k, st in self.status.items() if st.error and st.retry_at <= now]
            if not self.dirty and not self.full_requested and not retry:
                timeout = next_full - now
                pending = [st.retry_at for st in self.status.values() if st.error]
                if pending:
                    timeout = min(timeout, min(pending) - now)
                with anyio.move_on_after(max(timeout, 0.0)):
                    await self._wake.wait()
                self._wake = anyio.Event()
                now = time.monotonic()
                if now >= next_full:
                    self.full_requested = True
                continue
            # let a burst of events land before acting on it
            await anyio.sleep(0.002)
            try:
                if self.full_requested:
                    self.full_requested = False
                    self.dirty.clear()
                    trigger = "periodic" if now >= next_full else "resync"
                    next_full = time.monotonic() + self.resync_interval
                    await self.full_pass(trigger)
                else:
                    keys = set(self.dirty) | set(retry)
                    self.dirty.clear()
                    trigger = "retry" if retry and not keys - set(retry) else "event"
                    await self.keys_pass(keys, trigger)
            except Exception:
                # a bug or the host refusing in a way not foreseen: log it, keep the
                # loop alive, and converge everything on the next try
                log.exception("reconcile pass failed")
                self.full_requested = True
                await anyio.sleep(1)


async def clear_conntrack(forwards: list[I.Forward]) -> None:
    """Drop conntrack entries of forwards that were removed or retargeted, so existing
    flows do not keep using the old destination. Best effort: no conntrack tool, no-op."""
    import shutil

    tool = shutil.which("conntrack")
    if tool is None:
        return
    try:
        await _run_conntrack(tool, forwards)
    except OSError as exc:
        log.warning("clearing conntrack entries failed", error=str(exc))


async def _run_conntrack(tool: str, forwards: list[I.Forward]) -> None:
    for fwd in forwards:
        for hport, dport in fwd.pairs()[:64]:
            argv = [
                tool,
                "-D",
                "-f",
                "ipv4" if fwd.family == 4 else "ipv6",
                "-p",
                fwd.proto,
                "--orig-port-dst",
                str(hport),
                "--reply-src",
                str(fwd.dest_ip),
                "--reply-port-src",
                str(dport),
            ]
            await anyio.run_process(argv, check=False)
