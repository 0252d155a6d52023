"""apply, drift, purge and switching backends: the firewall side's whole life."""

from __future__ import annotations

import json

import pytest

from tests.support.daemon import Daemon
from tests.support.net import http_get, serve_http
from tests.support.topology import BACKENDS, CLIENT_HOST, add_client, build_seed, desired
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

DOC = {
    "intents": [
        {"kind": "ns", "name": "red"},
        {"kind": "ns", "name": "blue"},
        {"kind": "br", "name": "v-net-0", "addresses": ["192.168.15.5/24"]},
        {"kind": "plug", "ns": "red", "bridge": "v-net-0", "addresses": ["192.168.15.1/24"]},
        {"kind": "plug", "ns": "blue", "bridge": "v-net-0", "addresses": ["192.168.15.2/24"]},
        {"kind": "rule", "pattern": "tap*", "bridge": "v-net-0"},
        {"kind": "fwd", "host_ports": "80", "destination": "192.168.15.2:80"},
        *[
            {"kind": "fwd", "host_ports": str(10000 + i), "destination": f"192.168.15.2:{i + 1}"}
            for i in range(2000)
        ],
    ]
}


def wait_http(d: Daemon, expect: str, timeout: float = 10) -> None:
    wait_for(
        f"the client's request through the forward to answer {expect!r}",
        lambda: http_get(d, "client", f"http://{CLIENT_HOST}:80/") == expect,
        timeout=timeout,
    )


def poke_firewall(d: Daemon) -> None:
    """A foreign change that the daemon's drift watcher reports (it touches where the
    backend keeps its rules) and that leaves nothing of netagent's behind: for
    nftables, netagent's table made and deleted in one transaction; for iptables, a
    user chain in the nat table."""
    if d.firewall == "nftables":
        script = d.dir / "poke.nft"
        script.write_text("add table inet netagent\ndelete table inet netagent\n")
        d.sh("nft", "-f", str(script))
    else:
        d.sh("iptables", "-t", "nat", "-N", "USER-POKE")


def drift_pass_after(d: Daemon, mark: int) -> bool:
    """Whether, among the events logged from ``mark`` on, a firewall drift was noticed
    and a reconcile pass then ran (so the daemon has acted on it)."""
    names = d.event_names()[mark:]
    return "firewall drift" in names and "reconcile pass" in names[names.index("firewall drift") :]


@pytest.mark.parametrize("daemon", BACKENDS, indirect=True)
def test_apply_is_one_pass_and_idempotent(daemon: Daemon) -> None:
    doc = daemon.dir / "topology.json"
    doc.write_text(json.dumps(DOC))
    reply = json.loads(daemon.ctl("apply", str(doc), json_out=True, check=True).stdout)
    assert reply["ok"] and reply["result"]["changed"]
    assert reply["result"]["changes_total"] == len(DOC["intents"])
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "applied")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "applied"
    passes = [
        e
        for e in daemon.log_events()
        if e.get("event") == "reconcile pass" and e.get("trigger") == "request"
    ]
    assert passes[-1]["keys"] == len(DOC["intents"])  # the whole document in one pass
    again = daemon.ctl("apply", str(doc), check=True).stdout
    assert "nothing changed" in again
    # a bad document changes nothing and names the entry
    bad = daemon.dir / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "intents": [
                    {"kind": "ns", "name": "green"},
                    {"kind": "fwd", "host_ports": "80", "destination": "192.168.15.9:80"},
                ]
            }
        )
    )
    before = desired(daemon)
    r = daemon.ctl("apply", str(bad))
    assert r.returncode == 4 and "already forwarded" in r.stderr
    assert desired(daemon) == before


@pytest.mark.parametrize("daemon", BACKENDS, indirect=True)
def test_drift_is_repaired(daemon: Daemon) -> None:
    build_seed(daemon)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "up")
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "up"
    if daemon.firewall == "nftables":
        breakers = [["nft", "delete", "table", "inet", "netagent"], ["nft", "flush", "ruleset"]]
    else:
        breakers = [
            ["iptables", "-t", "nat", "-F"],
            ["iptables", "-t", "nat", "-F", "NETAGENT-PREROUTING"],
        ]
    for argv in breakers:
        daemon.sh(*argv)
        wait_http(daemon, "up")
    events = [e for e in daemon.log_events() if e.get("event") == "firewall drift"]
    assert len(events) >= len(breakers)
    # a user's own table: the repairs and the purge leave it as it is
    daemon.sh("nft", "add", "table", "ip", "mine")
    daemon.sh("nft", "add", "chain", "ip", "mine", "c", "{ type filter hook input priority 0; }")
    daemon.sh("nft", "add", "rule", "ip", "mine", "c", "tcp", "dport", "9", "counter")
    mine = daemon.sh("nft", "list", "table", "ip", "mine").stdout
    daemon.sh(*breakers[0])
    wait_http(daemon, "up")
    daemon.ctl("purge", "--yes", check=True)
    ruleset = daemon.sh("nft", "list", "ruleset").stdout
    assert "netagent" not in ruleset and "NETAGENT" not in ruleset
    assert daemon.sh("nft", "list", "table", "ip", "mine").stdout == mine
    # a drift pass after the purge must not bring anything back: once the daemon has
    # noticed a later foreign change and run a pass for it (so it has handled whatever
    # the purge's own changes told its watcher), nothing of netagent's is there
    mark = len(daemon.event_names())
    poke_firewall(daemon)
    wait_for(
        "a reconcile pass after the drift a foreign change made",
        lambda: drift_pass_after(daemon, mark),
        detail=lambda: daemon.log()[-3000:],
    )
    ruleset = daemon.sh("nft", "list", "ruleset").stdout
    assert "netagent" not in ruleset and "NETAGENT" not in ruleset, ruleset
    assert desired(daemon) == []


def test_purge_leaves_the_users_rules(daemon: Daemon) -> None:
    build_seed(daemon)
    daemon.sh("nft", "add", "table", "inet", "mine")
    daemon.sh(
        "nft", "add", "chain", "inet", "mine", "c", "{ type nat hook prerouting priority -50; }"
    )
    daemon.sh("nft", "add", "rule", "inet", "mine", "c", "tcp", "dport", "8", "counter")
    daemon.sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.9.0/24", "-j", "MASQUERADE")
    before_mine = daemon.sh("nft", "list", "table", "inet", "mine").stdout
    daemon.ctl("purge", "--yes", check=True)
    assert daemon.sh("nft", "list", "table", "inet", "mine").stdout == before_mine
    assert "-s 10.9.9.0/24 -j MASQUERADE" in daemon.sh("iptables-save", "-t", "nat").stdout
    assert "netagent" not in daemon.sh("nft", "list", "tables").stdout
    assert daemon.sh("ip", "netns", "list").stdout.strip() == ""
    assert desired(daemon) == []


def test_switching_backends_removes_the_old_rules(daemon: Daemon) -> None:
    build_seed(daemon)
    add_client(daemon)
    serve_http(daemon, "blue", "192.168.15.2", 80, "up")
    daemon.stop()
    daemon.firewall = "iptables"
    daemon.start()
    assert "netagent" not in daemon.sh("nft", "list", "tables").stdout
    saved = daemon.sh("iptables-save", "-t", "nat").stdout
    assert saved.count("--to-destination 192.168.15.2:80") == 1
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "up"
    daemon.stop()
    daemon.firewall = "auto"
    daemon.start()
    status = daemon.status()
    assert status["firewall"] == "nftables"
    assert "NETAGENT" not in daemon.sh("iptables-save", "-t", "nat").stdout
    assert any("auto" in str(e.get("why", "")) for e in daemon.log_events(since_start=True))
    assert http_get(daemon, "client", f"http://{CLIENT_HOST}:80/") == "up"
