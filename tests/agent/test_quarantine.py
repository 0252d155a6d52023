"""Quarantine on load: an intent an older netagent recorded and today's checks refuse
neither stops the start nor is lost; the rest loads and is installed (no root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netagent.agent import errors as E
from netagent.agent import intents as I
from netagent.agent import replay as R
from netagent.agent import store as S
from netagent.agent.kinds import default_kinds

from .world import RO, lines, make_world

KINDS = default_kinds()
#: what an older netagent accepted and journaled
SCOPED = {
    "kind": "forward",
    "proto": "tcp",
    "host_port": 8082,
    "dest_ip": "fe80::1%eth0",
    "dest_port": 80,
}
BROADCAST = {
    "kind": "forward",
    "proto": "tcp",
    "host_port": 8083,
    "dest_ip": "255.255.255.255",
    "dest_port": 80,
}
GOOD = I.make_forward("8081", "192.168.15.2:80")


def line(seq: int, key: str, intent: dict[str, Any] | None) -> bytes:
    return R.entry_line(seq, [{"key": key, "intent": intent}])


def older_journal(directory: Path, *more: bytes) -> None:
    """Journal lines (valid checksums) as an older netagent wrote them."""
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / "journal.jsonl").write_bytes(
        R.header_line(0)
        + line(1, "ns/red", {"kind": "ns", "name": "red"})
        + line(2, "fwd/tcp/8082/ipv6", SCOPED)
        + line(3, GOOD.key, GOOD.to_dict())
        + line(4, "fwd/tcp/8083", BROADCAST)
        + b"".join(more)
    )


def loaded(directory: Path) -> tuple[list[str], dict[str, str]]:
    store = S.StateStore(directory, KINDS)
    try:
        pairs = store.load()
        return sorted(k for k, _ in pairs), {q.key: q.reason for q in store.quarantine.entries()}
    finally:
        store.close()


def test_refused_intents_are_kept_aside_and_the_rest_loads(tmp_path: Path) -> None:
    older_journal(tmp_path)
    keys, held = loaded(tmp_path)
    assert keys == ["fwd/tcp/8081", "ns/red"]
    assert sorted(held) == ["fwd/tcp/8082/ipv6", "fwd/tcp/8083"]
    assert "carries a scope" in held["fwd/tcp/8082/ipv6"]
    assert (
        "255.255.255.255" in held["fwd/tcp/8083"] or "not a usable address" in held["fwd/tcp/8083"]
    )


def test_quarantined_intents_are_kept_in_every_snapshot(tmp_path: Path) -> None:
    older_journal(tmp_path)
    store = S.StateStore(tmp_path, KINDS)
    pairs = store.load()
    store.compact([i.to_dict() for _, i in pairs if i is not None])
    store.close()
    doc = json.loads((tmp_path / "state.json").read_bytes())
    assert [q["key"] for q in doc["quarantined"]] == ["fwd/tcp/8082/ipv6", "fwd/tcp/8083"]
    assert doc["quarantined"][0]["intent"] == SCOPED  # exactly as it was recorded
    assert doc["quarantined"][0]["seq"] == 2
    assert loaded(tmp_path)[1].keys() == {"fwd/tcp/8082/ipv6", "fwd/tcp/8083"}


def test_a_later_change_of_the_key_settles_it(tmp_path: Path) -> None:
    fixed = I.make_forward("8082", "[fd00::2]:80")
    older_journal(
        tmp_path,
        line(5, "fwd/tcp/8083", None),  # unforwarded later
        line(6, fixed.key, fixed.to_dict()),  # retargeted later
    )
    keys, held = loaded(tmp_path)
    assert keys == ["fwd/tcp/8081", "fwd/tcp/8082/ipv6", "ns/red"]
    assert held == {}


def test_a_refused_value_replaces_the_valid_one_it_was_recorded_over(tmp_path: Path) -> None:
    """Line 5 made fwd/tcp/8081 what today is refused: 8081 is quarantined, not the old
    destination revived."""
    bad = {**GOOD.to_dict(), "dest_ip": "224.0.0.1"}
    older_journal(tmp_path, line(5, GOOD.key, bad))
    keys, held = loaded(tmp_path)
    assert keys == ["ns/red"] and "multicast" in held[GOOD.key]


def test_a_format_1_snapshot_refused_intent_gets_its_kinds_key(tmp_path: Path) -> None:
    snapshot = {
        "format": 1,
        "seq": 3,
        "intents": [
            {"kind": "bridge", "name": "all", "addresses": ["10.9.0.1/24"]},
            {"kind": "ns", "name": "red"},
            BROADCAST,
            {"kind": "vlan", "id": 3},
        ],
    }
    (tmp_path / "state.json").write_text(json.dumps(snapshot))
    (tmp_path / "journal.jsonl").write_bytes(b"")
    keys, held = loaded(tmp_path)
    assert keys == ["ns/red"]
    assert sorted(held) == ["br/all", "fwd/tcp/8083", held_unknown(held)]
    assert "reserved" in held["br/all"]
    assert "unknown intent kind 'vlan'" in held[held_unknown(held)]


def held_unknown(held: dict[str, str]) -> str:
    return next(k for k in held if k.startswith("unknown/quarantined-"))


def test_a_key_that_does_not_match_its_intent_is_damage_not_quarantine(tmp_path: Path) -> None:
    older_journal(tmp_path, line(5, "fwd/tcp/1", GOOD.to_dict()))
    with pytest.raises(E.StateCorrupt, match=r"line 6: key 'fwd/tcp/1' does not match"):
        loaded(tmp_path)


# ---- through the API ------------------------------------------------------------------
async def test_show_status_and_forget(tmp_path: Path) -> None:
    older_journal(tmp_path / "state")
    w = make_world(tmp_path)
    async with w.running():
        w.rec.mark_all("start")
        await w.rec.run_until_idle("start")
        assert lines(w.fw.dump()) == ["forward fwd/tcp/8081: 8081/tcp -> 192.168.15.2:80"]
        show = await w.call("show")
        assert [(q["key"], q["kind"]) for q in show["quarantined"]] == [
            ("fwd/tcp/8082/ipv6", "forward"),
            ("fwd/tcp/8083", "forward"),
        ]
        assert show["quarantined"][0]["intent"] == SCOPED
        assert [i["key"] for i in show["intents"]] == ["ns/red", "fwd/tcp/8081"]
        status = await w.call("status")
        assert sorted(status["quarantined"]) == ["fwd/tcp/8082/ipv6", "fwd/tcp/8083"]
        assert status["summary"].endswith(", 2 quarantined")
        with pytest.raises(E.ReadOnly):
            await w.call("forget", peer=RO, key="fwd/tcp/8083")

        reply = await w.call("forget", key="fwd/tcp/8083")
        assert reply["changed"] is True
        [change] = reply["changes"]
        assert change == {
            "key": "fwd/tcp/8083",
            "action": "forgotten",
            "what": "quarantined forward fwd/tcp/8083",
        }
        with pytest.raises(E.NotFound, match=r"fwd/tcp/8083 is not quarantined"):
            await w.call("forget", key="fwd/tcp/8083")
        # a new intent under a quarantined key replaces it
        await w.call("forward.add", host_ports="8082", destination="[fd00::2]:80")
        assert (await w.call("show"))["quarantined"] == []
    w.store.close()
    keys, held = loaded(tmp_path / "state")
    assert keys == ["fwd/tcp/8081", "fwd/tcp/8082/ipv6", "ns/red"] and held == {}


async def test_a_quarantined_namespace_is_not_an_orphan(tmp_path: Path) -> None:
    """Its namespace carries netagent's mark and no valid intent wants it: still not an
    orphan while it is quarantined (it was acknowledged); once forgotten, it is."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "journal.jsonl").write_bytes(
        R.header_line(0) + line(1, "ns/default", {"kind": "ns", "name": "default"})
    )
    w = make_world(tmp_path)
    await w.net.ns_add("default")
    lo = await w.net.link("default", "lo")
    assert lo is not None
    await w.net.set_link("default", lo.index, alias="netagent:ns/default")
    async with w.running():
        await w.call("purge", orphans=True)
        assert "default" in w.net.ns_names()
        assert (await w.call("show"))["orphans"] == []
        await w.call("forget", key="ns/default")
        await w.call("purge", orphans=True)
        assert "default" not in w.net.ns_names()
