"""The reconciler over the fakes: one pass per request, the dependents rule, removal
order, failures with backoff, time limits, chunked periodic passes (the attach decisions:
``test_reconcile_attach.py``).

A real ``DesiredState`` and ``Reconciler`` (``tests/agent/world.py``) over ``FakeNetlink``
and ``FakeFirewall``; what the kernel and the firewall hold is read from their dumps.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from netagent.agent import keystatus, reconcile
from netagent.agent.api import kind_change
from netagent.agent.errors import BackendFailed
from netagent.agent.keystatus import DRIFTED, FAILING, IN_PLACE, PassResult, Ticket
from netagent.agent.ops import BY_OP
from netagent.agent.reconcile import FIREWALL
from netagent.agent.state import DesiredState

from ..support.wait import LIMIT, until
from .world import World, lines, make_world

PLUG = "plug/red/v-net-0"
BRIDGE = "br/v-net-0"


def requests(*reqs: tuple[str, dict[str, Any]]) -> Callable[[DesiredState], None]:
    """Several kinds' requests as one proposal (what ``apply`` does)."""

    def run(s: DesiredState) -> None:
        for op, args in reqs:
            kind_change(s.kinds, BY_OP[op].parse(args))(s)

    return run


def note(w: World, *reqs: tuple[str, dict[str, Any]]) -> Ticket:
    """Propose, commit and note, as the API does (without the journal)."""
    changes = w.state.propose(requests(*reqs))
    assert changes
    w.state.commit(changes)
    return w.rec.note(changes)


SEED = (
    ("ns.add", {"name": "red"}),
    ("bridge.add", {"name": "v-net-0", "addresses": ["192.168.15.5/24"]}),
    ("plug.add", {"ns": "red", "bridge": "v-net-0", "addresses": ["192.168.15.1/24"]}),
    ("forward.add", {"host_ports": "80", "destination": "192.168.15.1:80"}),
)


async def seeded(tmp_path: Path, **kw: Any) -> World:
    w = make_world(tmp_path, **kw)
    ticket = note(w, *SEED)
    with anyio.fail_after(LIMIT):
        await w.rec.run_until_idle("request")
    assert ticket.done.is_set() and not ticket.result.errors
    return w


async def test_a_request_is_realized_in_one_pass_and_its_ticket_holds_that_pass(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path)
    ticket = note(w, *SEED)
    async with w.running():
        with anyio.fail_after(LIMIT):
            result = await w.rec.wait(ticket)
        assert w.rec.passes == 1
    assert w.rec.last_pass["trigger"] == "request" and w.rec.last_pass["keys"] == 4
    assert result.errors == {}
    assert set(result.actions) == {"ns/red", BRIDGE, PLUG, FIREWALL, "host"}
    assert result.actions[PLUG][0] == "create veth veth-red-br <-> red:veth-red"
    assert result.actions["host"] == ["enabled net.ipv4.ip_forward"]
    assert lines(w.net.dump()) == [
        "lo - DOWN - - -",
        "v-net-0 bridge UP - netagent:br/v-net-0 192.168.15.5/24",
        "veth-red-br veth UP master=v-net-0 netagent:plug/red/v-net-0 -",
    ]
    assert lines(w.net.dump("red")) == [
        "lo - UP - netagent:ns/red -",
        "veth-red veth UP - netagent:plug/red/v-net-0 192.168.15.1/24",
        "default via 192.168.15.5 dev veth-red proto 201",
    ]
    assert lines(w.fw.dump()) == [
        "forward fwd/tcp/80: 80/tcp -> 192.168.15.1:80",
        "rule hairpin br/v-net-0 192.168.15.0/24",
    ]
    assert w.net.sysctls["net/ipv4/conf/v-net-0/route_localnet"] == "1"
    assert all(w.rec.status[k].state == IN_PLACE for k in w.state.intents)


async def test_a_full_pass_over_what_is_in_place_only_looks(tmp_path: Path) -> None:
    w = await seeded(tmp_path)
    before = list(w.net.calls)
    w.rec.mark_all("resync")
    with anyio.fail_after(LIMIT):
        total = await w.rec.run_until_idle("resync")
    assert total.actions == {} and total.errors == {}
    # the firewall is observed (a resync plans it whole) and found as it should be
    assert w.net.calls == [*before, ("fw.observe",)]


# ---- removal order ------------------------------------------------------------------
async def test_purge_removes_the_firewall_first_then_links_in_reverse_kind_order(
    tmp_path: Path,
) -> None:
    w = await seeded(tmp_path)
    async with w.running():
        await w.call("ns.add", name="blue")
        await w.call(
            "wire.add",
            ns_a="red",
            addresses_a="10.0.0.1/24",
            ns_b="blue",
            addresses_b="10.0.0.2/24",
        )
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        wire = w.state.get("wire/blue/red")
        assert wire is not None
        wire_end = wire.to_dict()["ifname_a"]
        mark = len(w.net.calls)
        reply = await w.call("purge")
    assert reply["errors"] == {}
    assert w.net.calls[mark:] == [
        ("fw.purge",),
        ("del_link", "red", wire_end),  # wire (order 4); its peer in blue goes with it
        ("del_link", None, "veth-red-br"),  # plug (3); attach rules (2) hold no link
        ("del_link", None, "v-net-0"),  # bridge (1)
        ("ns_del", "blue"),  # namespaces (0)
        ("ns_del", "red"),
    ]
    assert w.fw.dump() == "" and not w.fw.table
    assert lines(w.net.dump()) == ["lo - DOWN - - -"]
    assert w.net.ns_names() == []
    assert len(w.state) == 0 and set(w.rec.status) == {FIREWALL, "host", "orphans", "findings"}


async def test_a_pruning_apply_stops_the_forward_before_its_target_goes(tmp_path: Path) -> None:
    w = await seeded(tmp_path)
    mark = len(w.net.calls)
    async with w.running():
        reply = await w.call(
            "apply",
            intents=[
                {"kind": "ns", "name": "red"},
                {"kind": "bridge", "name": "v-net-0", "addresses": ["192.168.15.5/24"]},
            ],
            prune=True,
        )
    assert [c["key"] for c in reply["changes"]] == ["fwd/tcp/80", PLUG]
    assert w.net.calls[mark:] == [
        ("fw.apply", "update", ("delete forward fwd/tcp/80: 80/tcp -> 192.168.15.1:80",)),
        ("del_link", None, "veth-red-br"),
    ]


# ---- the dependents rule ------------------------------------------------------------
async def test_a_deleted_bridge_comes_back_with_its_plugs_and_attached_ports_in_one_pass(
    tmp_path: Path,
) -> None:
    w = await seeded(tmp_path)
    async with w.running():
        await w.call("attach.add", pattern="tap*", bridge="v-net-0")
        w.net.make_foreign_link("tap0")
        w.rec.mark_links([w.link("tap0").index])
        await until(lambda: w.link("tap0").master == w.link("v-net-0").index, "tap0 attached")
    await w.net.del_link(None, w.link("v-net-0").index)  # someone deletes the bridge
    assert w.link("veth-red-br").master is None and w.link("tap0").master is None

    w.rec.drift(BRIDGE, "v-net-0 was deleted")
    assert w.rec.status[BRIDGE].state == DRIFTED
    passes = w.rec.passes
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert w.rec.passes == passes + 1
    assert result.actions[BRIDGE][0] == "create bridge v-net-0"
    assert result.actions[PLUG] == ["enslave veth-red-br to v-net-0"]
    assert result.actions["rule/v-net-0/tap*"] == ["attached tap0 to v-net-0"]
    assert lines(w.net.dump()) == [
        "lo - DOWN - - -",
        "tap0 veth UP master=v-net-0 - -",
        "v-net-0 bridge UP - netagent:br/v-net-0 192.168.15.5/24",
        "veth-red-br veth UP master=v-net-0 netagent:plug/red/v-net-0 -",
    ]
    assert w.rec.status[BRIDGE].state == IN_PLACE
    assert [e["key"] for e in w.published("repaired")] == [BRIDGE, "rule/v-net-0/tap*", PLUG]


async def test_a_plug_announced_before_its_deleted_bridge_brings_the_bridge_back_first(
    tmp_path: Path,
) -> None:
    """The kernel announces a deleted bridge's ports leaving before the bridge goes: a
    pass can start with the plug alone. Its ensure finds no bridge; that is not the
    plug's failure: the bridge is ensured, the plug tried again, nothing fails."""
    w = await seeded(tmp_path)
    await w.net.del_link(None, w.link("v-net-0").index)
    w.rec.drift(PLUG, "veth-red-br left its bridge")  # the bridge's own event is late
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
    assert result.errors == {}
    assert result.actions[BRIDGE][0] == "create bridge v-net-0"
    assert result.actions[PLUG] == ["enslave veth-red-br to v-net-0"]
    assert w.link("veth-red-br").master == w.link("v-net-0").index
    assert w.rec.status[PLUG].state == IN_PLACE and w.published("error") == []
    # a plug that fails for a reason of its own: tried again once its prerequisites
    # are ensured, then failed; its retries (a failing key) are tried once each
    attempts: list[float] = []
    real = w.net.set_link

    async def failing(*args: Any, **kw: Any) -> Any:
        if kw.get("master") is None:
            return await real(*args, **kw)
        attempts.append(time.monotonic())
        raise OSError(errno.EPERM, "Operation not permitted")

    await w.net.enslave([(w.link("veth-red-br").index, 0)])
    w.net.set_link = failing  # type: ignore[method-assign]
    w.rec.drift(PLUG, "veth-red-br left its bridge")
    with anyio.fail_after(LIMIT):
        result = await w.rec.run_until_idle("event")
        assert list(result.errors) == [PLUG] and "not permitted" in result.errors[PLUG]
        assert len(attempts) == 2 and w.rec.status[PLUG].state == FAILING
        w.rec.mark([PLUG], "retry")
        result = await w.rec.run_until_idle("retry")
    w.net.set_link = real  # type: ignore[method-assign]
    assert list(result.errors) == [PLUG] and len(attempts) == 3


# ---- failures -----------------------------------------------------------------------
async def test_a_failing_ensure_fails_its_key_backs_off_and_a_later_retry_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystatus, "BACKOFF_MIN", 0.05)
    w = make_world(tmp_path)
    attempts: list[float] = []
    add_veth = w.net.add_veth

    async def counted(*args: Any, **kw: Any) -> None:
        attempts.append(time.monotonic())
        await add_veth(*args, **kw)

    monkeypatch.setattr(w.net, "add_veth", counted)
    for _ in range(2):
        w.net.fail("add_veth", OSError(errno.EPERM, "Operation not permitted"))
    async with w.running():
        with pytest.raises(BackendFailed) as exc:
            await w.call("apply", intents=[{"kind": k.split(".")[0], **a} for k, a in SEED[:3]])
        assert exc.value.details["errors"] == {
            PLUG: "PermissionError: [Errno 1] Operation not permitted"
        }
        # only its key: the namespace and the bridge of the same request are in place
        assert w.rec.status["ns/red"].state == IN_PLACE
        assert w.rec.status[BRIDGE].state == IN_PLACE
        st = w.rec.status[PLUG]
        assert (st.state, st.failures) == (FAILING, 1)
        first_retry = st.retry_at
        # BACKOFF_MIN after the failure (the upper bound is loose: a shared, noisy host)
        assert 0.05 <= first_retry - attempts[0] < 0.05 + 0.5

        await until(lambda: w.rec.status[PLUG].failures == 2, "the second failure")
        second_retry = w.rec.status[PLUG].retry_at
        # backoff doubles: the second wait is 0.1 s, from a retry at or after the first
        assert attempts[1] >= first_retry
        assert 0.1 <= second_retry - attempts[1] < 0.1 + 0.5

        await until(lambda: w.rec.status[PLUG].state == IN_PLACE, "the plug in place")
        assert attempts[2] >= second_retry
        assert len(attempts) == 3
    assert "veth-red-br veth UP master=v-net-0 netagent:plug/red/v-net-0 -" in lines(w.net.dump())
    assert [e["key"] for e in w.published("error")] == [PLUG, PLUG]
    assert [e["key"] for e in w.published("recovered")] == [PLUG]


async def test_a_hung_call_fails_only_its_key_and_the_loop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystatus, "STEP_TIMEOUT", 0.1)
    monkeypatch.setattr(keystatus, "BACKOFF_MIN", 0.05)
    w = make_world(tmp_path)
    w.net.hang("add_veth")
    async with w.running():
        t0 = time.monotonic()
        with pytest.raises(BackendFailed) as exc:
            await w.call("apply", intents=[{"kind": k.split(".")[0], **a} for k, a in SEED[:3]])
        assert time.monotonic() - t0 < 1.0
        assert exc.value.details["errors"] == {PLUG: "did not finish within 0.1 s"}
        assert w.rec.status[BRIDGE].state == IN_PLACE
        # never wedged: the next request is served, and the retry succeeds
        reply = await w.call("ns.add", name="blue")
        assert reply["actions"]["ns/blue"][0] == "create namespace blue"
        await until(lambda: w.rec.status[PLUG].state == IN_PLACE, "the plug in place")

        # the firewall hangs: only the firewall fails; a full sync later installs it
        w.fw.hang("apply")
        with pytest.raises(BackendFailed) as exc:
            await w.call("forward.add", host_ports="80", destination="192.168.15.1:80")
        assert exc.value.details["errors"] == {FIREWALL: "did not finish within 0.1 s"}
        assert w.rec.status["fwd/tcp/80"].state == IN_PLACE
        await until(lambda: w.rec.status[FIREWALL].state == IN_PLACE, "the firewall synced")
        assert "forward fwd/tcp/80: 80/tcp -> 192.168.15.1:80" in lines(w.fw.dump())
        assert (await w.call("ns.add", name="green"))["changed"] is True


async def test_a_firewall_update_that_does_not_fit_falls_back_to_a_full_plan(
    tmp_path: Path,
) -> None:
    w = await seeded(tmp_path)
    w.fw.drop_forward("fwd/tcp/80")  # someone removed it; nobody told the reconciler
    mark = len(w.net.calls)
    async with w.running():
        reply = await w.call("forward.del", host_ports="80")
        # the update (delete what is not there) is refused whole; the full plan finds
        # nothing left to do
        assert FIREWALL not in reply["actions"]
        assert [c[:2] for c in w.net.calls[mark:]] == [("fw.apply", "update"), ("fw.observe",)]

        w.fw.drop_table()  # someone flushed the ruleset
        mark = len(w.net.calls)
        reply = await w.call("forward.add", host_ports="81", destination="192.168.15.1:81")
        assert reply["actions"][FIREWALL] == ["create table (1 forwards, 1 rules)"]
        assert [c[:2] for c in w.net.calls[mark:]] == [
            ("fw.apply", "update"),
            ("fw.observe",),
            ("fw.apply", "full"),
        ]
    assert lines(w.fw.dump()) == [
        "forward fwd/tcp/81: 81/tcp -> 192.168.15.1:81",
        "rule hairpin br/v-net-0 192.168.15.0/24",
    ]


# ---- updates ------------------------------------------------------------------------
async def test_updating_a_bridges_addresses_removes_the_stale_one(tmp_path: Path) -> None:
    w = make_world(tmp_path)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        reply = await w.call("bridge.add", name="v-net-0", address=["192.168.15.6/24"])
        assert reply["changes"][0]["action"] == "updated"
        assert reply["actions"][BRIDGE] == [
            "add 192.168.15.6/24 to v-net-0",
            "remove 192.168.15.5/24 from v-net-0",
        ]
        assert lines(w.net.dump()) == [
            "lo - DOWN - - -",
            "v-net-0 bridge UP - netagent:br/v-net-0 192.168.15.6/24",
        ]
        await w.call("bridge.add", name="v-net-0", address=["10.9.0.1/24", "fd00:9::1/64"])
    assert (
        lines(w.net.dump())[1] == "v-net-0 bridge UP - netagent:br/v-net-0 10.9.0.1/24 fd00:9::1/64"
    )
    assert lines(w.fw.dump()) == [
        "rule hairpin br/v-net-0 10.9.0.0/24",
        "rule hairpin br/v-net-0 fd00:9::/64",
    ]


async def test_a_stale_address_goes_even_when_the_first_try_of_the_update_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystatus, "BACKOFF_MIN", 0.02)
    w = make_world(tmp_path)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.5/24"])
        w.net.fail("add_address", OSError(errno.ENOMEM, "Cannot allocate memory"))
        with pytest.raises(BackendFailed):
            await w.call("bridge.add", name="v-net-0", address=["192.168.15.6/24"])
        await until(lambda: w.rec.status[BRIDGE].state == IN_PLACE, "the retry")
    assert lines(w.net.dump())[1] == "v-net-0 bridge UP - netagent:br/v-net-0 192.168.15.6/24"


async def test_a_new_gateway_moves_the_plugs_default_route(tmp_path: Path) -> None:
    w = await seeded(tmp_path)
    async with w.running():
        await w.call("bridge.add", name="v-net-0", address=["192.168.15.6/24"])
    assert lines(w.net.dump("red"))[-1] == "default via 192.168.15.6 dev veth-red proto 201"


# ---- periodic passes ----------------------------------------------------------------
def record_passes(w: World, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(trigger, keys) of every pass, whatever level its log line has."""
    seen: list[tuple[str, int]] = []
    log_pass = w.rec._log_pass

    async def recorded(batch: Any, t0: float, result: PassResult) -> None:
        seen.append((batch.trigger, len(batch.keys - reconcile.PSEUDO)))
        await log_pass(batch, t0, result)

    monkeypatch.setattr(w.rec, "_log_pass", recorded)
    return seen


async def test_a_periodic_pass_is_chunked_and_a_request_goes_before_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "CHUNK", 2)
    w = make_world(tmp_path)
    note(w, *[("ns.add", {"name": n}) for n in "abcdef"])
    with anyio.fail_after(LIMIT):
        await w.rec.run_until_idle("start")
    passes = record_passes(w, monkeypatch)
    w.rec.mark_all("periodic")
    ticket = note(w, ("ns.add", {"name": "z"}))
    async with w.running():
        with anyio.fail_after(LIMIT):
            await w.rec.wait(ticket)
        await until(lambda: not w.rec.busy(), "the periodic chunks done")
    # the request alone (no part of the sweep rides along), then the sweep chunk by
    # chunk (ns/a+b, ns/c+d, ns/e+f, then the firewall, host and orphans steps, which
    # are not counted as keys, two to a chunk); the findings the request moved on may
    # come between them, in a pass of their own with a trigger of their own
    assert [p for p in passes if p[0] != "findings"] == [
        ("request", 1),
        ("periodic", 2),
        ("periodic", 2),
        ("periodic", 2),
        ("periodic", 0),
        ("periodic", 0),
    ]
    assert ticket.result.actions["ns/z"][0] == "create namespace z"
    assert ("ns_add", "z") in w.net.calls


async def test_the_findings_after_a_request_are_a_pass_of_their_own_named_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``status``'s last pass and the metrics' trigger label tell a findings pass from a
    slice of the sweep (it is neither periodic nor the request's)."""
    w = make_world(tmp_path)
    passes = record_passes(w, monkeypatch)
    async with w.running():
        await w.call("ns.add", name="red")
        await until(lambda: any(t == "findings" for t, _ in passes), "the findings pass")
        assert w.rec.last_pass["trigger"] == "findings"
    assert ("request", 1) in passes
    assert ("findings", 0) in passes
    assert ("periodic", 0) not in passes  # no sweep was due (resync is an hour away)


async def test_a_sweep_stops_within_its_budget_and_at_once_for_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each slice of the periodic sweep spends at most PERIODIC_BUDGET (and always does
    one key, so the sweep moves on); a request that arrives during a slice is served by
    the next pass, not after the whole slice or sweep."""
    monkeypatch.setattr(reconcile, "PERIODIC_BUDGET", 0.0)
    w = make_world(tmp_path)
    names = [f"n{i}" for i in range(8)]
    note(w, *[("ns.add", {"name": n}) for n in names])
    with anyio.fail_after(LIMIT):
        await w.rec.run_until_idle("start")
    looked: list[str] = []
    link = w.net.link

    async def slow_link(ns: object, name: str) -> object:
        looked.append(str(ns))
        await anyio.sleep(0.01)
        return await link(ns, name)  # type: ignore[arg-type]

    monkeypatch.setattr(w.net, "link", slow_link)
    passes = record_passes(w, monkeypatch)
    w.rec.mark_all("periodic")
    async with w.running():
        await until(lambda: not w.rec.busy(), "the sweep done")
        # one namespace per slice: the budget is spent after the first
        assert passes[: len(names)] == [("periodic", 1)] * len(names), passes
        assert all(n in looked for n in names)

        # a request during a sweep: served at once, its pass its own
        passes.clear()
        w.rec.mark_all("periodic")
        await until(lambda: w.rec.busy(), "a sweep running")
        t0 = time.monotonic()
        ticket = note(w, ("ns.add", {"name": "late"}))
        with anyio.fail_after(LIMIT):
            await w.rec.wait(ticket)
        waited = time.monotonic() - t0
        assert ticket.result.actions["ns/late"][0] == "create namespace late"
        assert waited < 0.5, waited  # not behind 8 x 10 ms slices plus the rest
        await until(lambda: not w.rec.busy(), "the sweep done again")
    assert [p for p in passes if p[0] == "request"] == [("request", 1)]
    assert len(passes) >= len(names) + 1  # the sweep went on after it


async def test_an_event_for_a_key_the_sweep_has_yet_to_reach_is_served_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key waiting in the periodic sweep (spread over minutes at scale) that a kernel
    event marks leaves the sweep: its repair does not wait for the sweep's turn."""
    monkeypatch.setattr(reconcile, "CHUNK", 1)
    monkeypatch.setattr(reconcile, "SWEEP_REST", 1e6)  # after one slice, none for ages
    w = make_world(tmp_path)
    names = [f"n{i}" for i in range(6)]
    note(w, *[("ns.add", {"name": n}) for n in names])
    with anyio.fail_after(LIMIT):
        await w.rec.run_until_idle("start")
    passes = record_passes(w, monkeypatch)
    w.rec.mark_all("periodic")
    async with w.running():
        await until(lambda: passes == [("periodic", 1)], "the sweep's first slice")
        await w.net.ns_del("n5")  # the sweep's last: it would wait for ages
        w.rec.mark(["ns/n5"], "event")
        await until(lambda: w.net.ns_exists("n5"), "n5 made again on the event")
        assert passes[-1] == ("event", 1)
        assert w.rec.busy()  # the rest of the sweep still waits its turn
    assert w.rec.status["ns/n5"].state == IN_PLACE


@pytest.mark.parametrize("sweep_larger", [False, True])
async def test_what_a_marked_key_needs_that_the_sweep_holds_comes_into_its_pass(
    tmp_path: Path, sweep_larger: bool
) -> None:
    """A plug marked by an event while its namespace waits in the sweep: the pass takes
    the namespace too (realized first), whichever of the sweep and the needed keys is
    walked; what is needed and not in the sweep, or needed by nothing marked, stays."""
    w = make_world(tmp_path)
    note(w, *SEED, ("ns.add", {"name": "blue"}))
    with anyio.fail_after(LIMIT):
        await w.rec.run_until_idle("start")
    rec = w.rec
    rec._sweep = dict.fromkeys(["ns/red", "ns/blue", "fwd/tcp/80"])
    if sweep_larger:
        rec._sweep.update(dict.fromkeys(f"x/{i}" for i in range(len(w.state.needed()) + 1)))
    rec._sweep_at = time.monotonic() + 3600  # no slice of the sweep itself is due
    rec._pending = {PLUG: "event"}
    batch = rec._take()
    assert batch.keys == {PLUG, "ns/red"}
    assert "ns/red" not in rec._sweep and "ns/blue" in rec._sweep


# ---- attach rules -------------------------------------------------------------------
