"""``IptablesBackend`` (``backends/iptables/backend.py``): the programs it runs and how,
its drift watcher, probing. No program runs: ``process.exec_program`` is faked (and
``subprocess.run`` for the probe, which these tests run on the real host)."""

from __future__ import annotations

import os
import struct
import subprocess
from typing import Any

import pytest

from netagent.agent import intents as I
from netagent.agent.errors import BackendFailed
from netagent.backends import firewall, nftmonitor
from netagent.backends.firewall import Batch, FirewallSpec
from netagent.backends.iptables import IptablesBackend
from netagent.backends.iptables import backend as backend_mod
from netagent.backends.iptables.rules import desired_chains
from netagent.backends.iptables.save import FamilyObserved
from netagent.backends.nftmonitor import NftMonitorWatcher, Transactions, is_own
from tests.backends.iptables_samples import (
    EMPTY_SAVE,
    JUMPS,
    SPEC,
    FakeRun,
    backend,
    in_place,
    install_fake_run,
    nothing,
    payload,
)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    return install_fake_run(monkeypatch)


# ---- the registry ---------------------------------------------------------------------


def test_registry_finds_the_backend() -> None:
    assert firewall.get_backend("iptables") is IptablesBackend
    assert IptablesBackend.name == "iptables"


async def test_apply_runs_one_restore_per_family(fake_run: FakeRun) -> None:
    be = backend()
    batch = be.plan(SPEC, nothing())
    await be.apply(batch)
    assert [c.argv[1:] for c in fake_run.calls] == [["--noflush", "-w"]] * 2
    assert [c.argv[0].rsplit("/", 1)[-1] for c in fake_run.calls] == [
        "iptables-restore",
        "ip6tables-restore",
    ]
    assert fake_run.calls[0].input == payload(batch)["4"].encode()
    assert fake_run.calls[1].input == payload(batch)["6"].encode()
    assert all(c.env["LANG"] == "C" for c in fake_run.calls)


async def test_apply_of_an_empty_batch_runs_nothing(fake_run: FakeRun) -> None:
    await backend().apply(Batch())
    assert fake_run.calls == []


async def test_apply_failure_carries_stderr(fake_run: FakeRun) -> None:
    fake_run.answers["iptables-restore"] = (
        1, "", "iptables-restore: line 3 failed: Bad rule (does a matching rule exist?)",
    )  # fmt: skip
    with pytest.raises(BackendFailed, match="line 3 failed"):
        await backend().apply(backend().plan(SPEC, nothing()))
    assert len(fake_run.calls) == 1  # IPv6 is not tried after IPv4 failed


async def test_observe_reads_both_families(fake_run: FakeRun) -> None:
    obs = await backend().observe()
    assert [c.argv[1:] for c in fake_run.calls] == [["-t", "nat"], ["-t", "nat"], ["-t", "filter"]]
    assert backend().plan(SPEC, obs).empty
    assert (await backend().observe()).present


async def test_observe_failure_is_a_backend_error(fake_run: FakeRun) -> None:
    fake_run.answers["iptables-save"] = (1, "", "iptables-save: cannot initialize")
    with pytest.raises(BackendFailed, match="cannot initialize"):
        await backend().observe()


async def test_purge_removes_exactly_ours_in_one_restore_per_family(fake_run: FakeRun) -> None:
    removed = await backend().purge()
    restores = [c for c in fake_run.calls if c.argv[0].endswith("-restore")]
    assert len(restores) == 2
    assert restores[0].input is not None
    lines = restores[0].input.decode().splitlines()
    chains = [
        *("NETAGENT-DNAT", "NETAGENT-OUTPUT", "NETAGENT-POSTROUTING", "NETAGENT-PREROUTING"),
        *("NETAGENT-TCP-0-4095", "NETAGENT-TCP-64-127"),
        *("NETAGENT-UDP-4096-8191", "NETAGENT-UDP-8000-8063"),
    ]
    assert lines == [
        "*nat",
        "-D OUTPUT " + JUMPS["OUTPUT"],
        "-D POSTROUTING " + JUMPS["POSTROUTING"],
        "-D PREROUTING " + JUMPS["PREROUTING"],
        *(f":{chain} - [0:0]" for chain in chains),
        *(f"-X {chain}" for chain in chains),
        "COMMIT",
    ]
    assert "USER-CHAIN" not in restores[0].input.decode()
    assert "deleted jump PREROUTING -> NETAGENT-PREROUTING (ipv4)" in removed
    assert "deleted chain NETAGENT-PREROUTING (ipv4, 2 rules)" in removed
    assert "deleted chain NETAGENT-TCP-64-127 (ipv4, 2 rules)" in removed
    assert "deleted chain NETAGENT-TCP-64-127 (ipv6, 1 rule)" in removed


def test_purge_steps_count_the_blocks_past_a_few() -> None:
    many = tuple(I.make_forward(str(1000 * i + 1), "192.168.15.2:80") for i in range(1, 30))
    have = FamilyObserved(desired_chains(FirewallSpec(forwards=many), 4))
    steps = backend_mod.purge_steps(have, 4)
    assert steps[:4] == [
        "deleted chain NETAGENT-DNAT (ipv4, 8 rules)",
        "deleted chain NETAGENT-OUTPUT (ipv4, 2 rules)",
        "deleted chain NETAGENT-POSTROUTING (ipv4, 1 rule)",
        "deleted chain NETAGENT-PREROUTING (ipv4, 2 rules)",
    ]
    assert steps[4:] == ["deleted 37 other chains (ipv4, 58 rules)"]


async def test_purge_of_nothing_runs_no_restore(fake_run: FakeRun) -> None:
    fake_run.answers["iptables-save"] = (0, EMPTY_SAVE, "")
    fake_run.answers["ip6tables-save"] = (0, EMPTY_SAVE, "")
    assert await backend().purge() == []
    assert not any(c.argv[0].endswith("-restore") for c in fake_run.calls)
    assert not (await backend().observe()).present


def test_probe_without_iptables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "_resolve", lambda program: None)
    ok, why = IptablesBackend.probe()
    assert not ok
    assert "iptables" in why
    assert "not installed" in why


def test_probe_reports_a_kernel_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs no iptables: ``subprocess.run`` is faked (this test runs on the real host)."""
    monkeypatch.setattr(backend_mod, "_resolve", lambda program: f"/usr/sbin/{program}")
    seen: list[list[str]] = []

    def fake(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 3, b"", b"can't initialize iptables table `nat'")

    monkeypatch.setattr(subprocess, "run", fake)
    ok, why = IptablesBackend.probe()
    assert not ok
    assert "can't initialize" in why
    assert seen[0] == ["/usr/sbin/iptables", "-w", "-t", "nat", "-S"]


def test_probe_success(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_mod, "_resolve", lambda program: f"/usr/sbin/{program}")

    def fake(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        out = b"iptables v1.8.9 (nf_tables)\n" if "--version" in argv else b"-P PREROUTING ACCEPT\n"
        return subprocess.CompletedProcess(argv, 0, out, b"")

    monkeypatch.setattr(subprocess, "run", fake)
    ok, why = IptablesBackend.probe()
    assert ok
    assert why.startswith("iptables v1.8.9 (nf_tables)")


async def test_apply_of_a_batch_with_nothing_to_write_runs_nothing(fake_run: FakeRun) -> None:
    be = backend()
    batch = be.plan(SPEC, in_place())
    assert batch.empty and batch.payload is not None
    await be.apply(batch)
    assert fake_run.calls == []


async def test_an_update_is_one_restore_per_family_it_changes(fake_run: FakeRun) -> None:
    new = I.make_forward("443", "192.168.15.2:443")
    be = backend()
    await be.apply(be.plan_update(FirewallSpec(forwards=(*SPEC.forwards, new)), [new], []))
    assert [c.argv[0].rsplit("/", 1)[-1] for c in fake_run.calls] == ["iptables-restore"]


# ---- the drift watcher -------------------------------------------------------------------


def flavoured(monkeypatch: pytest.MonkeyPatch, multi: str) -> IptablesBackend:
    """A backend whose programs resolve to ``multi`` (xtables-nft-multi or -legacy-)."""
    monkeypatch.setattr(backend_mod, "_resolve", lambda program: f"/usr/sbin/{program}")
    monkeypatch.setattr(os.path, "realpath", lambda p: f"/usr/sbin/{multi}")
    return IptablesBackend(families=(4, 6), generation=lambda: None)


def test_iptables_nft_gets_an_nft_monitor_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    be = flavoured(monkeypatch, "xtables-nft-multi")
    watcher = be.drift_watcher()
    assert isinstance(watcher, NftMonitorWatcher)
    assert watcher.markers == (" ip nat", " ip6 nat", " ip filter INPUT", " ip filter NETAGENT-")
    assert watcher.own_pids == be.programs.own_pids


def test_legacy_iptables_has_no_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Legacy changes never reach nf_tables: the periodic pass finds them."""
    assert flavoured(monkeypatch, "xtables-legacy-multi").drift_watcher() is None


async def test_own_restores_are_not_drift_and_others_are(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While (and just after) the backend runs iptables-restore, the watcher names its
    pid as ours: that commit is not drift; the same lines from any other pid are."""
    be = flavoured(monkeypatch, "xtables-nft-multi")
    watcher = be.drift_watcher()
    assert isinstance(watcher, NftMonitorWatcher)
    assert watcher.own_pids() == frozenset()
    await be.apply(be.plan(SPEC, nothing()))
    pids = [40001, 40002]  # the fake's pids of the two restores
    assert all(pid in seen for pid, seen in zip(pids, fake_run.own_during, strict=True))
    me = os.getpid()
    tx = Transactions(watcher.markers, lambda pid: is_own(pid, me, watcher.own_pids()))
    change = "add rule ip nat NETAGENT-DNAT tcp dport 80 counter"
    for pid in pids:
        assert tx.feed(change) is None
        assert tx.feed(f"# new generation 7 by process {pid} (iptables-restor)") is None
    assert tx.feed(change) is None
    drift = tx.feed("# new generation 8 by process 999999 (iptables)")
    assert drift is not None and "pid 999999" in drift


def test_lost_monitor_events_count_as_drift() -> None:
    """``nft flush ruleset`` with 65,535 iptables rules overflows the monitor's socket:
    nft prints that it lost events, and the transaction's generation line never comes.
    The loss is drift (today's code reported nothing, and only the periodic pass came)."""
    tx = Transactions((" ip nat",), lambda pid: False)
    assert tx.feed("delete rule ip nat NETAGENT-TCP-64-127 handle 9") is None
    drift = tx.feed("# ERROR: We lost some netlink events!")
    assert drift is not None and "lost events" in drift
    assert tx.pending == []
    # what follows is read as before
    assert tx.feed("delete table ip nat") is None
    assert tx.feed("# new generation 9 by process 12 (nft)") is not None


def _nfmsg(msg: int, family: int, attrs: list[tuple[int, bytes]]) -> bytes:
    body = struct.pack("=BBH", family, 0, 0)
    for kind, value in attrs:
        n = 4 + len(value)
        body += struct.pack("=HH", n, kind) + value + b"\0" * ((4 - n % 4) % 4)
    return struct.pack("=IHHII", 16 + len(body), 10 << 8 | msg, 0, 0, 0) + body


def test_raw_notifications_read_as_monitor_lines() -> None:
    """The watcher reads nf_tables' notifications itself: each object message's type
    and table (attribute 1), and the generation message's pid and process name."""
    data = (
        _nfmsg(8, 2, [(1, b"nat\0"), (2, b"NETAGENT-DNAT\0")])
        + _nfmsg(2, 1, [(1, b"netagent\0")])
        + _nfmsg(15, 0, [(1, struct.pack(">I", 42)), (2, struct.pack(">I", 777)), (3, b"nft\0")])
    )
    lines = nftmonitor.parse(data)
    assert lines == [
        "delete rule ip nat",
        "delete table inet netagent",
        "# new generation 42 by process 777 (nft)",
    ]
    tx = Transactions((" inet netagent",), lambda pid: pid == 1)
    assert [tx.feed(line) for line in lines[:2]] == [None, None]
    drift = tx.feed(lines[2])
    assert drift == "nft (pid 777) changed netagent's rules: delete table inet netagent"
    # a foreign transaction of other tables only is told apart
    for line in nftmonitor.parse(data[:40]):
        assert tx.feed(line) is None
    assert tx.feed("# new generation 43 by process 778 (iptables)") is None
    assert tx.foreign == (frozenset({"ip nat"}), "iptables (pid 778)")


def test_a_run_of_the_same_notification_reads_as_one_line() -> None:
    """``iptables -t nat -F`` over 10,000 forwards is 10,000 ``delete rule ip nat``: read
    once per run, and again after the generation (the next transaction's own)."""
    delete = _nfmsg(8, 2, [(1, b"nat\0"), (2, b"NETAGENT-DNAT\0")])
    other = _nfmsg(8, 2, [(1, b"filter\0"), (2, b"FORWARD\0")])
    gen = _nfmsg(15, 0, [(1, struct.pack(">I", 42)), (2, struct.pack(">I", 777)), (3, b"ipt\0")])
    lines = nftmonitor.parse(delete * 500 + other + delete * 2 + gen + delete)
    assert lines == [
        "delete rule ip nat",
        "delete rule ip filter",
        "delete rule ip nat",
        "# new generation 42 by process 777 (ipt)",
        "delete rule ip nat",
    ]
    tx = Transactions((" ip nat",), lambda pid: False)
    for line in lines[:3]:
        assert tx.feed(line) is None
    assert tx.feed(lines[3]) == "ipt (pid 777) changed netagent's rules: delete rule ip nat"
