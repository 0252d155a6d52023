"""``NftablesBackend.plan`` and ``plan_update``: pure, on observations parsed from JSON.

``nft_table.json`` is what ``nft -j list table inet netagent`` printed (nft 1.0.6, Debian
12) in a throwaway network namespace after the backend's own full plan for ``SPEC`` was
applied with ``nft -f -``. So "nothing to do" is pinned against the form nft really lists
(map elements as ``[80, {"concat": ["192.168.15.2", 80]}]``, rule comments, handles).
Each test changes a copy of that document the way someone else's change, or a lost
update, would. Nothing here runs nft.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netagent.agent import intents as I
from netagent.backends import nftables, nftelems
from netagent.backends.firewall import FirewallSpec, VxlanGuard
from netagent.backends.nftables import NftablesBackend
from netagent.backends.nftcount import key_bytes
from netagent.backends.nftobserve import Observed, parse_table

V_NET_0 = I.Bridge(
    "v-net-0",
    (ipaddress.ip_interface("192.168.15.5/24"), ipaddress.ip_interface("fd00:15::1/64")),
    masquerade=True,
)
BR1 = I.Bridge("br1", (ipaddress.ip_interface("10.1.0.1/16"),))
FWD80 = I.make_forward("80", "192.168.15.2:80")
FWD_RANGE = I.make_forward("8000-8001", "192.168.15.3:9000-9001", "udp")
FWD_BOUND = I.make_forward("81", "10.0.0.9:81", host_ip="10.0.0.1")
#: ranges whose ports keep their numbers: one interval element each
FWD_SAME = I.make_forward("7000-7099", "192.168.15.3:7000-7099")
FWD_SAME_BOUND = I.make_forward("5000-5009", "10.0.0.9:5000-5009", "udp", host_ip="10.0.0.1")
FWD6 = I.make_forward("80", "[fd00:15::2]:8080")
FWD6_BOUND = I.make_forward("443", "[fd00:15::3]:443", host_ip="fd00::1")
GUARD = VxlanGuard("netagent.1", 4789, frozenset({"198.51.100.2", "198.51.100.3"}))
SPEC = FirewallSpec(
    forwards=(FWD80, FWD_RANGE, FWD_BOUND, FWD6, FWD6_BOUND, FWD_SAME, FWD_SAME_BOUND),
    bridges=(V_NET_0, BR1),
    vxlan=GUARD,
)
DOC: dict[str, Any] = json.loads((Path(__file__).parent / "nft_table.json").read_text())
T = "inet netagent"


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> NftablesBackend:
    monkeypatch.setenv("NETAGENT_NFT", "process")  # no libnftables handle: nothing to open
    return NftablesBackend()


def observed(change: Callable[[list[dict[str, Any]]], None] | None = None) -> Observed:
    items = copy.deepcopy(DOC)
    if change is not None:
        change(items["nftables"])
    return parse_table(items)


def the_map(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(i["map"] for i in items if i.get("map", {}).get("name") == name)
    return found


def rules(items: list[dict[str, Any]], comment: str) -> list[dict[str, Any]]:
    return [i for i in items if i.get("rule", {}).get("comment") == comment]


def without_rule(comment: str) -> Callable[[list[dict[str, Any]]], None]:
    def change(items: list[dict[str, Any]]) -> None:
        for item in rules(items, comment):
            items.remove(item)

    return change


# ---- nothing to do, or everything ---------------------------------------------------
def test_the_table_as_nft_lists_it_needs_nothing(nft: NftablesBackend) -> None:
    batch = nft.plan(SPEC, observed())
    assert (batch.steps, batch.payload, batch.rebuild, batch.touched) == (
        [],
        [],
        False,
        frozenset(),
    )
    assert batch.empty


def test_nothing_there_is_a_full_create(nft: NftablesBackend) -> None:
    batch = nft.plan(SPEC, Observed(present=False))
    assert batch.rebuild and batch.touches("fwd/tcp/80")
    assert batch.steps == ["create table inet netagent (41 rules, 8 map elements, 2 VXLAN peers)"]
    assert batch.payload is not None
    head, table, elements = batch.payload[:2], batch.payload[2], batch.payload[3:]
    # add + delete + create: one transaction whether or not a table is there
    assert head == [f"add table {T}", f"delete table {T}"]
    assert table.startswith(f"table {T} {{\n") and table.endswith("\n}")
    assert table.count(" map @dnat_") == 32  # 16 maps, each read in prerouting and output
    assert 'comment "localhost"' in table
    assert elements == [
        f"add element {T} dnat_tcp4 {{ 80 : 192.168.15.2 . 80 }}",
        f"add element {T} dnat_tcp4h {{ 10.0.0.1 . 81 : 10.0.0.9 . 81 }}",
        f"add element {T} dnat_tcp4r {{ 7000-7099 : 192.168.15.3 }}",
        f"add element {T} dnat_tcp6 {{ 80 : fd00:15::2 . 8080 }}",
        f"add element {T} dnat_tcp6h {{ fd00::1 . 443 : fd00:15::3 . 443 }}",
        f"add element {T} dnat_udp4 {{ 8000 : 192.168.15.3 . 9000, 8001 : 192.168.15.3 . 9001 }}",
        f"add element {T} dnat_udp4hr {{ 10.0.0.1 . 5000-5009 : 10.0.0.9 }}",
        f"add element {T} vxlan_peers {{ 198.51.100.2, 198.51.100.3 }}",
    ]
    assert "set vxlan_peers { type ipv4_addr; }" in table
    assert "type filter hook input priority 0; policy accept;" in table
    # nothing there to keep working: the table, its intervals and the peers by
    # libnftables, then the other elements by nfnetlink (the same table, sooner)
    assert isinstance(batch.payload, nftelems.TableScript)
    assert batch.payload.head == [
        *batch.payload[:3],
        f"add element {T} dnat_tcp4r {{ 7000-7099 : 192.168.15.3 }}",
        f"add element {T} dnat_udp4hr {{ 10.0.0.1 . 5000-5009 : 10.0.0.9 }}",
        f"add element {T} vxlan_peers {{ 198.51.100.2, 198.51.100.3 }}",
    ]
    assert batch.payload.elements.writable and not batch.payload.elements.gone
    assert [e[0] for e in batch.payload.elements.new] == [
        "dnat_tcp4",
        "dnat_tcp4h",
        "dnat_tcp6",
        "dnat_tcp6h",
        "dnat_udp4",
        "dnat_udp4",
    ]


DAMAGE: dict[str, Callable[[list[dict[str, Any]]], None]] = {
    "a map gone": lambda items: items.remove({"map": the_map(items, "dnat_udp6h")}),
    "a dnat rule gone": lambda items: items.remove(rules(items, "dnat_tcp4")[1]),
    "a chain gone": lambda items: items.remove(
        next(i for i in items if i.get("chain", {}).get("name") == "output")
    ),
    "the localhost rule gone": without_rule("localhost"),
    "the peers' set gone": lambda items: items.remove(
        next(i for i in items if i.get("set", {}).get("name") == "vxlan_peers")
    ),
    "the input chain gone": lambda items: items.remove(
        next(i for i in items if i.get("chain", {}).get("name") == "input")
    ),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_table_is_rebuilt_whole(
    nft: NftablesBackend, damage: Callable[[list[dict[str, Any]]], None]
) -> None:
    batch = nft.plan(SPEC, observed(damage))
    assert batch.rebuild
    assert batch.steps == ["rebuild table inet netagent (41 rules, 8 map elements, 2 VXLAN peers)"]
    # one transaction: what is there keeps working until it is replaced
    assert type(batch.payload) is list
    assert batch.payload == nft.plan(SPEC, Observed(present=False)).payload


# ---- elements -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("map_name", "index", "key", "line"),
    [
        ("dnat_tcp4", 0, "fwd/tcp/80", "dnat_tcp4 { 80 : 192.168.15.2 . 80 }"),
        ("dnat_udp4", 1, "fwd/udp/8000-8001", "dnat_udp4 { 8001 : 192.168.15.3 . 9001 }"),
        ("dnat_tcp6h", 0, "fwd/tcp/443/fd00::1", "dnat_tcp6h { fd00::1 . 443 : fd00:15::3 . 443 }"),
    ],
    ids=["one port", "one port of a range", "bound ipv6"],
)
def test_a_missing_element_is_added_alone(
    nft: NftablesBackend, map_name: str, index: int, key: str, line: str
) -> None:
    def lose(items: list[dict[str, Any]]) -> None:
        del the_map(items, map_name)["elem"][index]

    batch = nft.plan(SPEC, observed(lose))
    assert batch.payload == [f"add element {T} {line}"]
    assert batch.steps == [f"add element {line}"]
    assert not batch.rebuild
    assert batch.touched == {key}
    assert batch.touches(key) and not batch.touches("fwd/tcp/81/10.0.0.1")


def test_an_extra_element_is_deleted_and_touches_no_forward(nft: NftablesBackend) -> None:
    def extra(items: list[dict[str, Any]]) -> None:
        the_map(items, "dnat_tcp4")["elem"].append([9999, {"concat": ["192.168.15.9", 22]}])
        the_map(items, "dnat_tcp4h")["elem"].append(
            [{"concat": ["10.0.0.1", 82]}, {"concat": ["10.0.0.9", 82]}]
        )

    batch = nft.plan(SPEC, observed(extra))
    assert batch.payload == [
        f"delete element {T} dnat_tcp4 {{ 9999 }}",
        f"delete element {T} dnat_tcp4h {{ 10.0.0.1 . 82 }}",
    ]
    assert batch.steps == [
        "delete element dnat_tcp4 { 9999 : 192.168.15.9 . 22 }",
        "delete element dnat_tcp4h { 10.0.0.1 . 82 : 10.0.0.9 . 82 }",
    ]
    assert batch.touched == frozenset() and not batch.rebuild


def test_an_element_pointing_elsewhere_is_replaced(nft: NftablesBackend) -> None:
    def retarget(items: list[dict[str, Any]]) -> None:
        the_map(items, "dnat_tcp6")["elem"][0][1]["concat"] = ["fd00:15::99", 8080]

    batch = nft.plan(SPEC, observed(retarget))
    assert batch.payload == [
        f"delete element {T} dnat_tcp6 {{ 80 }}",
        f"add element {T} dnat_tcp6 {{ 80 : fd00:15::2 . 8080 }}",
    ]
    assert batch.touched == {"fwd/tcp/80/ipv6"}


# ---- per-bridge rules ---------------------------------------------------------------
def test_a_missing_bridge_rule_is_added(nft: NftablesBackend) -> None:
    batch = nft.plan(SPEC, observed(without_rule("hairpin br/br1 10.1.0.0/16")))
    assert batch.payload == [
        f"add rule {T} postrouting ct status dnat ip saddr 10.1.0.0/16 ip daddr 10.1.0.0/16 "
        'masquerade comment "hairpin br/br1 10.1.0.0/16"'
    ]
    assert batch.steps == ["add rule hairpin br/br1 10.1.0.0/16"]
    assert batch.touched == frozenset() and not batch.rebuild


def test_the_rules_of_a_bridge_no_longer_desired_are_deleted(nft: NftablesBackend) -> None:
    spec = FirewallSpec(forwards=SPEC.forwards, bridges=(V_NET_0,), vxlan=GUARD)
    batch = nft.plan(spec, observed())
    handle = rules(DOC["nftables"], "hairpin br/br1 10.1.0.0/16")[0]["rule"]["handle"]
    assert batch.payload == [f"delete rule {T} postrouting handle {handle}"]
    assert batch.steps == ["delete rule hairpin br/br1 10.1.0.0/16"]


def test_a_copied_bridge_rule_is_deleted_and_added_once(nft: NftablesBackend) -> None:
    def copied(items: list[dict[str, Any]]) -> None:
        twin = copy.deepcopy(rules(items, "masquerade br/v-net-0 192.168.15.0/24")[0])
        twin["rule"]["handle"] = 99
        items.append(twin)

    batch = nft.plan(SPEC, observed(copied))
    assert batch.payload is not None
    first = rules(DOC["nftables"], "masquerade br/v-net-0 192.168.15.0/24")[0]["rule"]["handle"]
    assert [line.split(" comment")[0] for line in batch.payload] == [
        f"delete rule {T} postrouting handle {first}",
        f"delete rule {T} postrouting handle 99",
        f'add rule {T} postrouting ip saddr 192.168.15.0/24 oifname != "v-net-0" masquerade',
    ]


def test_a_readdressed_bridge_gets_rules_for_its_new_subnet(nft: NftablesBackend) -> None:
    moved = I.Bridge("br1", (ipaddress.ip_interface("10.2.0.1/16"),))
    spec = FirewallSpec(forwards=SPEC.forwards, bridges=(V_NET_0, moved), vxlan=GUARD)
    batch = nft.plan(spec, observed())
    handle = rules(DOC["nftables"], "hairpin br/br1 10.1.0.0/16")[0]["rule"]["handle"]
    assert batch.payload == [
        f"delete rule {T} postrouting handle {handle}",
        f"add rule {T} postrouting ct status dnat ip saddr 10.2.0.0/16 ip daddr 10.2.0.0/16 "
        'masquerade comment "hairpin br/br1 10.2.0.0/16"',
    ]


# ---- the VXLAN guard ----------------------------------------------------------------
def test_a_new_peer_is_one_element(nft: NftablesBackend) -> None:
    peers = GUARD.peers | {"198.51.100.9"}
    spec = FirewallSpec(SPEC.forwards, SPEC.bridges, VxlanGuard("netagent.1", 4789, peers))
    batch = nft.plan(spec, observed())
    assert batch.payload == [f"add element {T} vxlan_peers {{ 198.51.100.9 }}"]
    assert batch.steps == ["add VXLAN peer 198.51.100.9"]
    assert not batch.rebuild and batch.touched == frozenset()


def test_a_gone_peer_is_one_element_deleted(nft: NftablesBackend) -> None:
    spec = FirewallSpec(
        SPEC.forwards, SPEC.bridges, VxlanGuard("netagent.1", 4789, frozenset({"198.51.100.3"}))
    )
    batch = nft.plan(spec, observed())
    assert batch.payload == [f"delete element {T} vxlan_peers {{ 198.51.100.2 }}"]


def test_the_guard_rule_is_put_back_alone(nft: NftablesBackend) -> None:
    batch = nft.plan(SPEC, observed(without_rule("vxlan-guard 4789")))
    assert batch.payload == [
        f"add rule {T} input meta nfproto ipv4 udp dport 4789 ip saddr != @vxlan_peers counter "
        'drop comment "vxlan-guard 4789"'
    ]


def test_without_a_vxlan_device_its_rules_and_peers_go(nft: NftablesBackend) -> None:
    batch = nft.plan(FirewallSpec(SPEC.forwards, SPEC.bridges), observed())
    assert batch.payload is not None
    handles = {
        c: rules(DOC["nftables"], c)[0]["rule"]["handle"]
        for c in ("vxlan-guard 4789", "vxlan-dnat netagent.1")
    }
    assert sorted(batch.payload) == sorted(
        [
            f"delete rule {T} input handle {handles['vxlan-guard 4789']}",
            f"delete rule {T} postrouting handle {handles['vxlan-dnat netagent.1']}",
            f"delete element {T} vxlan_peers {{ 198.51.100.2, 198.51.100.3 }}",
        ]
    )


# ---- updates ------------------------------------------------------------------------
def test_plan_update_lines(nft: NftablesBackend) -> None:
    fwd82 = I.make_forward("82", "192.168.15.2:82")
    bound = I.make_forward("82", "10.0.0.9:82", host_ip="10.0.0.1")
    batch = nft.plan_update(SPEC, added=[fwd82, bound], removed=[FWD80, FWD_RANGE])
    assert batch.payload == [
        f"delete element {T} dnat_tcp4 {{ 80 }}",
        f"delete element {T} dnat_udp4 {{ 8000, 8001 }}",
        f"add element {T} dnat_tcp4 {{ 82 : 192.168.15.2 . 82 }}",
        f"add element {T} dnat_tcp4h {{ 10.0.0.1 . 82 : 10.0.0.9 . 82 }}",
    ]
    assert batch.steps == [
        "delete element dnat_tcp4 { 80 : 192.168.15.2 . 80 }",
        "delete element dnat_udp4 { 8000 : 192.168.15.3 . 9000 }",
        "delete element dnat_udp4 { 8001 : 192.168.15.3 . 9001 }",
        "add element dnat_tcp4 { 82 : 192.168.15.2 . 82 }",
        "add element dnat_tcp4h { 10.0.0.1 . 82 : 10.0.0.9 . 82 }",
    ]
    assert batch.touched == {fwd82.key, bound.key} and not batch.rebuild
    assert nft.plan_update(SPEC, [], []).empty


def test_an_update_carries_its_elements_for_the_nfnetlink_writer(nft: NftablesBackend) -> None:
    fwd82 = I.make_forward("82", "192.168.15.2:82")
    batch = nft.plan_update(SPEC, added=[fwd82], removed=[FWD80])
    assert isinstance(batch.payload, nftelems.ElementScript) and batch.payload.writable
    assert batch.payload.gone == [("dnat_tcp4", "80", "192.168.15.2 . 80")]
    assert batch.payload.new == [("dnat_tcp4", "82", "192.168.15.2 . 82")]
    data, acked = nftelems.batch("inet", "netagent", batch.payload.gone, batch.payload.new, 7)
    assert acked == [8, 9]  # one delete message, one add message, between begin and end
    assert data.count(b"dnat_tcp4\0") == 2 and nftelems.value_bytes("192.168.15.2 . 82") in data
    # an interval (a range that keeps its ports) is two kernel elements: nft writes it
    ranged = I.make_forward("9000-9009", "192.168.15.2:9000-9009")
    payload = nft.plan_update(SPEC, [ranged], []).payload
    assert isinstance(payload, nftelems.ElementScript) and not payload.writable


def test_value_bytes_are_as_nf_tables_stores_them() -> None:
    assert nftelems.value_bytes("10.0.0.2 . 80") == bytes([10, 0, 0, 2, 0, 80, 0, 0])
    assert nftelems.value_bytes("10.0.0.2") == bytes([10, 0, 0, 2])
    assert len(nftelems.value_bytes("fd00::2 . 443")) == 20


def test_an_element_is_encoded_as_its_attributes_are_nested() -> None:
    """The element's precomputed frame gives the bytes built attribute by attribute
    (a port key and its value, a concatenated IPv6 key, a key alone for a delete)."""
    from netagent.backends.nftcount import ELEM_KEY, NFTA_DATA_VALUE, NFTA_LIST_ELEM, _attr

    def nested(key: bytes, value: bytes | None) -> bytes:
        inner = _attr(ELEM_KEY, _attr(NFTA_DATA_VALUE, key), nested=True)
        if value is not None:
            inner += _attr(nftelems.ELEM_DATA, _attr(NFTA_DATA_VALUE, value), nested=True)
        return _attr(NFTA_LIST_ELEM, inner, nested=True)

    cases = [
        (key_bytes("80"), nftelems.value_bytes("10.0.0.2 . 80")),
        (key_bytes("fd00::1 . 443"), nftelems.value_bytes("fd00::2 . 8443")),
        (key_bytes("10.0.0.1 . 80"), nftelems.value_bytes("10.0.0.2")),
        (key_bytes("80"), None),
        (key_bytes("fd00::1 . 443"), None),
    ]
    for key, value in cases:
        assert nftelems._element(key, value) == nested(key, value), (key, value)
    assert key_bytes("8080") == bytes([0x1F, 0x90]) and key_bytes("1000-1999") == bytes([3, 232])


def test_a_big_update_is_told_in_counts(nft: NftablesBackend) -> None:
    many = [I.make_forward(str(p), f"192.168.15.2:{p}") for p in range(2000, 2060)]
    batch = nft.plan_update(SPEC, added=many, removed=[FWD_RANGE])
    assert batch.steps == ["delete 2 map elements", "add 60 map elements"]
    assert batch.payload is not None and len(batch.payload) == 2  # one line per map and verb


# ---- pure ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [None, without_rule("hairpin br/br1 10.1.0.0/16"), DAMAGE["a map gone"]],
    ids=["intact", "a rule missing", "damaged"],
)
def test_the_same_inputs_give_the_same_batch_and_change_nothing(
    nft: NftablesBackend,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[list[dict[str, Any]]], None] | None,
) -> None:
    obs = observed(change)
    before = copy.deepcopy(obs)
    first = nft.plan(SPEC, obs)
    again = nft.plan(SPEC, obs)
    other = NftablesBackend().plan(SPEC, copy.deepcopy(obs))
    for batch in (again, other):
        assert (batch.steps, batch.payload, batch.rebuild, batch.touched) == (
            first.steps,
            first.payload,
            first.rebuild,
            first.touched,
        )
    assert obs == before
    update = nft.plan_update(SPEC, [FWD80], [FWD6])
    assert nft.plan_update(SPEC, [FWD80], [FWD6]) == update


# ---- counters and the localhost guard -------------------------------------------------
def test_maps_without_counters_are_written_anew_once(nft: NftablesBackend) -> None:
    """A table written before counters: its maps have no ``counter`` flag, so the table
    is rebuilt once (with them), the elements counting from then on."""

    def uncounted(items: list[dict[str, Any]]) -> None:
        for item in items:
            if "map" in item:
                item["map"].pop("stmt", None)

    batch = nft.plan(SPEC, observed(uncounted))
    assert batch.rebuild
    assert batch.payload is not None
    assert batch.payload[2].count("counter; }") == 16


def test_element_counters_are_read_per_forward() -> None:
    def counted(items: list[dict[str, Any]]) -> None:
        elems = the_map(items, "dnat_udp4")["elem"]
        elems[0][0]["elem"]["counter"] = {"packets": 3, "bytes": 180}
        elems[1][0]["elem"]["counter"] = {"packets": 2, "bytes": 120}

    obs = observed(counted)
    assert obs.counted >= {"dnat_tcp4", "dnat_udp6h"}
    counts = nftables.forward_counts(obs, [FWD_RANGE, FWD80, I.make_forward("1", "10.0.0.2:1")])
    # a range sums its ports' elements; a forward that is not there has no entry
    assert counts == {FWD_RANGE.key: (5, 300), FWD80.key: (0, 0)}


def test_the_localhost_guard_follows_the_ipv4_bridges(nft: NftablesBackend) -> None:
    """CVE-2020-8558: wanted while a bridge has an IPv4 address (route_localnet is set
    on it then); a missing guard is added alone; without IPv4 bridges it goes."""
    assert 'comment "localhost-guard"' in nft.plan(SPEC, Observed()).payload[2]  # type: ignore[index]
    batch = nft.plan(SPEC, observed(without_rule("localhost-guard")))
    assert batch.payload == [f"add rule {T} input {nftables.GUARD_RULE}"]
    assert not batch.rebuild and not batch.touched
    v6_only = I.Bridge("v6", (ipaddress.ip_interface("fd00:16::1/64"),))
    spec = FirewallSpec(forwards=SPEC.forwards, bridges=(v6_only,))
    batch = nft.plan(spec, observed())
    handle = rules(DOC["nftables"], "localhost-guard")[0]["rule"]["handle"]
    assert f"delete rule {T} input handle {handle}" in (batch.payload or [])


# ---- ranges whose ports keep their numbers ----------------------------------------------
def test_a_range_that_keeps_its_ports_is_one_interval() -> None:
    """``1-32767`` to ``IP:1-32767`` is one element of a ranged map (the packet keeps its
    port, the map gives the address), as nft lists it back; a range that moves its ports
    stays one element per port."""
    obs = observed()
    assert nftables.forward_elems(FWD_SAME) == [("dnat_tcp4r", "7000-7099", "192.168.15.3")]
    assert nftables.forward_elems(FWD_SAME_BOUND) == [
        ("dnat_udp4hr", "10.0.0.1 . 5000-5009", "10.0.0.9")
    ]
    assert set(nftables.forward_elems(FWD_SAME)) <= obs.elems
    assert set(nftables.forward_elems(FWD_SAME_BOUND)) <= obs.elems
    assert len(nftables.forward_elems(FWD_RANGE)) == 2
    big = I.make_forward("1-65535", "192.168.15.2:1-65535")
    assert len(nftables.forward_elems(big)) == 1
    table = nftables._table_text({})
    assert "map dnat_tcp4r { type inet_service : ipv4_addr; flags interval; counter; }" in table
    assert (
        "map dnat_udp6hr { type ipv6_addr . inet_service : ipv6_addr; flags interval; counter; }"
        in table
    )


def test_a_lost_interval_is_added_and_a_stray_one_deleted(nft: NftablesBackend) -> None:
    def change(items: list[dict[str, Any]]) -> None:
        m = the_map(items, "dnat_tcp4r")
        m["elem"] = [[{"elem": {"val": {"range": [9000, 9009]}}}, "192.168.15.9"]]

    batch = nft.plan(SPEC, observed(change))
    assert not batch.rebuild and batch.touched == {FWD_SAME.key}
    assert batch.payload == [
        f"delete element {T} dnat_tcp4r {{ 9000-9009 }}",
        f"add element {T} dnat_tcp4r {{ 7000-7099 : 192.168.15.3 }}",
    ]
    update = nft.plan_update(SPEC, added=[], removed=[FWD_SAME, FWD_SAME_BOUND])
    assert update.payload == [
        f"delete element {T} dnat_tcp4r {{ 7000-7099 }}",
        f"delete element {T} dnat_udp4hr {{ 10.0.0.1 . 5000-5009 }}",
    ]


def test_an_interval_counts_for_its_forward() -> None:
    def counted(items: list[dict[str, Any]]) -> None:
        elems = the_map(items, "dnat_tcp4r")["elem"]
        elems[0][0]["elem"]["counter"] = {"packets": 7, "bytes": 420}

    counts = nftables.forward_counts(observed(counted), [FWD_SAME, FWD_SAME_BOUND])
    assert counts == {FWD_SAME.key: (7, 420), FWD_SAME_BOUND.key: (0, 0)}
