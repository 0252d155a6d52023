"""Orphans: objects marked as netagent's that the desired state does not hold are found,
reported by ``show`` and removed by ``purge``; nothing without the mark is touched."""

from __future__ import annotations

import json
import random
import subprocess
import time

import pytest

from tests.support.daemon import Daemon, netagent_argv

pytestmark = pytest.mark.privileged


def marked(d: Daemon) -> dict[str, str | None]:
    """Every interface carrying a netagent mark, from the kernel itself: where -> the key
    its alias names (None: only the creation-time group). A namespace's mark is its lo's."""
    found: dict[str, str | None] = {}
    names = [line.split()[0] for line in d.sh("ip", "netns", "list").stdout.splitlines()]
    for ns in [None, *names]:
        where = ["-n", ns] if ns else []
        for link in json.loads(d.sh("ip", *where, "-d", "-j", "link", "show").stdout or "[]"):
            alias = link.get("ifalias") or ""
            if alias.startswith("netagent:"):
                found[f"{ns or 'host'}:{link['ifname']}"] = alias.removeprefix("netagent:")
            elif link.get("group") == "20033":
                found[f"{ns or 'host'}:{link['ifname']}"] = None
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
    assert marked(daemon) == {}
    assert show(daemon)["orphans"] == []
    assert "mine" in daemon.sh("ip", "link", "show", "mine").stdout
    assert "theirs" in daemon.sh("ip", "netns", "list").stdout


def test_kill_9_during_apply_prune_and_purge_leaves_nothing_unaccounted(
    daemon: Daemon, rng_seed: int
) -> None:
    """kill -9 at random points of ``apply --prune`` and of ``purge``: after the restart,
    nothing marked as netagent's is left that the desired state does not hold (the
    start carries out the acknowledged removals), and ``purge`` leaves nothing."""
    rng = random.Random(rng_seed)
    big, small = daemon.dir / "big.json", daemon.dir / "small.json"
    big.write_text(json.dumps(topology(12)))
    small.write_text(json.dumps(topology(2)))
    for cycle in range(4):
        daemon.ok("apply", str(big))
        op = ["apply", "--prune", str(small)] if cycle % 2 == 0 else ["purge", "--yes"]
        proc = subprocess.Popen(
            [*netagent_argv(), "ctl", "--socket", daemon.socket, *op],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.0, 0.15))  # the kill's moment, drawn from the seed
        daemon.kill9()
        proc.wait(timeout=30)
        daemon.start()
        desired = {i["key"] for i in show(daemon)["intents"]}  # type: ignore[attr-defined]
        left = show(daemon)["orphans"]
        assert left == [], f"cycle {cycle}: orphans left after the start: {left}"
        stray = {w: k for w, k in marked(daemon).items() if k not in desired}
        assert stray == {}, f"cycle {cycle}: marked, but not desired: {stray}"
    daemon.ok("purge", "--yes")
    assert marked(daemon) == {}
    assert show(daemon)["orphans"] == []
