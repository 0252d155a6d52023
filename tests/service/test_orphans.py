"""Orphans: objects marked as netagent's that the desired state does not hold are found,
reported by ``show`` and removed by ``purge``; nothing without the mark is touched."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.privileged


def marked(d: Daemon) -> set[str]:
    """Every interface and namespace carrying a netagent mark, from the kernel itself."""
    found = set()
    for ns in [
        None,
        *(line.split()[0] for line in d.sh("ip", "netns", "list").stdout.splitlines()),
    ]:
        argv = (
            ["ip", "-d", "-j", "link", "show"]
            if ns is None
            else ["ip", "-n", ns, "-d", "-j", "link", "show"]
        )
        for link in json.loads(d.sh(*argv).stdout or "[]"):
            alias = link.get("ifalias") or ""
            if alias.startswith("netagent:") or link.get("group") == "20033":
                found.add(f"{ns or 'host'}:{link['ifname']}")
    return found


def show(d: Daemon) -> dict[str, object]:
    reply = json.loads(d.ctl("show", json_out=True, check=True).stdout)
    result: dict[str, object] = reply["result"]
    return result


def topology(n: int) -> dict[str, object]:
    intents: list[dict[str, object]] = [
        {"kind": "bridge", "name": "br-o", "addresses": ["10.77.0.1/16"]}
    ]
    for i in range(n):
        intents.append({"kind": "ns", "name": f"o{i}"})
        intents.append(
            {"kind": "plug", "ns": f"o{i}", "bridge": "br-o", "addresses": [f"10.77.0.{i + 2}/16"]}
        )
    return {"intents": intents}


def test_forgotten_state_leaves_orphans_that_show_reports_and_purge_removes(daemon: Daemon) -> None:
    doc = daemon.dir / "doc.json"
    doc.write_text(json.dumps(topology(4)))
    daemon.ok("apply", str(doc))
    daemon.sh("ip", "link", "add", "mine", "type", "bridge")  # someone else's
    daemon.sh("ip", "netns", "add", "theirs")
    daemon.stop()
    for name in ("state.json", "journal.jsonl"):
        (daemon.state_dir / name).unlink(missing_ok=True)  # the state is lost
    daemon.start()
    orphans = {o["describe"] for o in show(daemon)["orphans"]}  # type: ignore[attr-defined]
    assert "link br-o (marked br/v-net-0)" not in orphans
    assert any(o.startswith("link br-o ") for o in orphans), orphans
    assert {f"namespace o{i} (marked ns/o{i})" for i in range(4)} <= orphans
    assert not any("mine" in o or "theirs" in o for o in orphans)
    assert "orphan" in daemon.ok("show")
    daemon.ok("purge", "--yes", "--orphans")
    assert marked(daemon) == set()
    assert show(daemon)["orphans"] == []
    assert "mine" in daemon.sh("ip", "link", "show", "mine").stdout
    assert "theirs" in daemon.sh("ip", "netns", "list").stdout


def test_kill_9_during_apply_prune_and_purge_leaves_nothing_purge_cannot_find(
    daemon: Daemon,
) -> None:
    seed = int(os.environ.get("NETAGENT_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (NETAGENT_TEST_SEED={seed} replays it)")
    rng = random.Random(seed)
    big, small = daemon.dir / "big.json", daemon.dir / "small.json"
    big.write_text(json.dumps(topology(12)))
    small.write_text(json.dumps(topology(2)))
    for cycle in range(4):
        daemon.ok("apply", str(big))
        op = ["apply", "--prune", str(small)] if cycle % 2 == 0 else ["purge", "--yes"]
        import subprocess

        from tests.conftest import netagent_argv

        proc = subprocess.Popen(
            [*netagent_argv(), "ctl", "--socket", daemon.socket, *op],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.0, 0.15))
        daemon.kill9()
        proc.wait(timeout=30)
        daemon.start()
        desired_keys = {i["key"] for i in show(daemon)["intents"]}  # type: ignore[attr-defined]
        orphan_names = {
            f"{o['ns'] or 'host'}:{o['name']}" if o["what"] == "link" else f"ns:{o['name']}"
            for o in show(daemon)["orphans"]  # type: ignore[attr-defined]
        }
        # every marked interface is either desired (its key) or reported as an orphan
        for where in marked(daemon):
            ns, _, name = where.partition(":")
            if where in orphan_names or f"ns:{ns}" in orphan_names:
                continue
            assert desired_keys, (
                f"seed {seed} cycle {cycle}: {where} is neither desired nor an orphan"
            )
    daemon.ok("purge", "--yes")
    assert marked(daemon) == set(), f"seed {seed}"
    assert show(daemon)["orphans"] == [], f"seed {seed}"
