"""The kinds' registry and what the desired state asks of a kind: the order of a pass's
keys, the relations a kind declares, the index entries made from them (pure, no root)."""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any

import pytest

from netagent.agent.api import kind_change
from netagent.agent.kinds import FEW_KEYS, Registry, default_kinds
from netagent.agent.kinds.base import RELATIONS, Kind
from netagent.agent.ops import BY_OP
from netagent.agent.reconcile import PSEUDO
from netagent.agent.state import DesiredState

KINDS = default_kinds()


def reference_order(keys: list[str], reverse: bool = False) -> list[str]:
    """The order the reconciler used before :meth:`Registry.split`: by kind order
    (backwards for removals), then key."""
    sign = -1 if reverse else 1
    return sorted(keys, key=lambda k: (sign * KINDS.order_of_key(k), k))


def some_keys(rng: random.Random, n: int) -> list[str]:
    prefixes = [k.key_prefix for k in KINDS]
    words = ["a", "b", "red", "v-net-0", "x/y", "0", "Z", "-"]
    keys = {f"{rng.choice(prefixes)}/{rng.choice(words)}{rng.randrange(50)}" for _ in range(n)}
    keys |= set(rng.sample(sorted(PSEUDO), 3))
    # near misses of a prefix: not of that kind (of none, or another's)
    keys |= {"fwdx/1", "ns", "plug-/2", "bridge0/3"}
    return sorted(keys, key=lambda _k: rng.random())


@pytest.mark.parametrize("seed", range(20))
def test_split_gives_the_reconcilers_order(seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    # a few keys (looked up one by one) and many (cut at the prefixes)
    keys = some_keys(rng, [0, 2, 6, 150, rng.randrange(200)][seed % 5])
    if seed % 5 < 3:
        assert len(keys) <= FEW_KEYS
    elif seed % 5 == 3:
        assert len(keys) > FEW_KEYS
    parts = KINDS.split(keys)
    assert KINDS.in_order(parts) == reference_order(keys)
    assert KINDS.in_order(parts, reverse=True) == reference_order(keys, reverse=True)
    # each key in exactly one part, of its own kind (None: of no kind)
    seen = [k for _kind, ks in parts for k in ks]
    assert sorted(seen) == sorted(keys)
    for kind, ks in parts:
        assert all(KINDS.of_key(k) is kind for k in ks)


def test_kinds_of_one_order_are_merged_by_key() -> None:
    # CNI attachments and wires share an order: their keys interleave by key
    same = [k for k in KINDS if k.order == KINDS.get("wire").order]  # type: ignore[union-attr]
    assert len(same) == 2
    keys = [f"{same[0].key_prefix}/b", f"{same[1].key_prefix}/a", f"{same[0].key_prefix}/c"]
    assert KINDS.in_order(KINDS.split(keys)) == reference_order(keys)


def reference_follows(keys: list[str]) -> bool:
    found = False
    for key in keys:
        kind = KINDS.of_key(key)
        if kind is None or not kind.firewall:
            continue
        if not kind.firewall_follows:
            return False
        found = True
    return found


@pytest.mark.parametrize(
    "keys",
    [
        [],
        ["firewall", "host"],
        ["peer/10.0.0.2"],
        ["peer/10.0.0.2", "firewall"],
        ["peer/10.0.0.2", "fwd/tcp/80"],
        ["fwd/tcp/80"],
        ["ns/red", "plug/red/v-net-0"],
        ["bridge/v-net-0", "peer/10.0.0.2"],
    ],
)
def test_firewall_follows(keys: list[str]) -> None:
    assert Registry.firewall_follows(KINDS.split(keys)) == reference_follows(keys)


def test_relations_are_what_a_kind_overrides() -> None:
    forward = KINDS.get("forward")
    assert forward is not None
    assert forward.relations == {"needs", "index"}
    assert not forward.may_look  # it owns no interface names
    ns = KINDS.get("ns")
    assert ns is not None and ns.may_look  # its own must_look
    plug = KINDS.get("plug")
    assert plug is not None and "names" in plug.relations and plug.may_look
    for kind in KINDS:
        for relation in RELATIONS:
            overridden = getattr(type(kind), relation) is not getattr(Kind, relation)
            assert (relation in kind.relations) == overridden, (kind.name, relation)
    assert KINDS.firewall_names == {k.name for k in KINDS if k.firewall}
    assert KINDS.looking_names == {k.name for k in KINDS if k.may_look}


def all_entries(state: DesiredState, intent: Any) -> list[tuple[str, Hashable]]:
    """Every relation asked, as before the kinds declared theirs."""
    kind = state.kinds.of(intent)
    out: list[tuple[str, Hashable]] = [("needs", k) for k in kind.needs(intent)]
    out += [("name", n) for n in kind.names(intent)]
    for ns, segment, addr in kind.addresses(intent):
        out += [("ns-addr", ns), ("segment-ip", (segment, addr.ip))]
    out += [("ns", ns) for ns in kind.namespaces(intent)]
    out += list(kind.index(intent))
    return out


def test_index_entries_skip_only_what_is_empty() -> None:
    state = DesiredState(default_kinds(), external_namespace=lambda n: False)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("ns.add", {"name": "red"}),
        ("ns.add", {"name": "blue"}),
        ("bridge.add", {"name": "v-net-0", "addresses": ["192.168.15.5/24", "fd00:15::5/64"]}),
        ("plug.add", {"ns": "red", "bridge": "v-net-0", "addresses": ["192.168.15.1/24"]}),
        (
            "wire.add",
            {
                "ns_a": "red",
                "ns_b": "blue",
                "addresses_a": ["10.9.0.1/30"],
                "addresses_b": ["10.9.0.2/30"],
            },
        ),
        ("attach.add", {"pattern": "tap*", "bridge": "v-net-0"}),
        ("forward.add", {"host_ports": "8000-8002", "destination": "192.168.15.1:9000-9002"}),
        ("forward.add", {"host_ports": "80", "destination": "[fd00:15::1]:80"}),
    ]
    for op, args in requests:
        state.commit(state.propose(kind_change(state.kinds, BY_OP[op].parse(args))))
    assert len(state) == len(requests)
    for intent in state.intents.values():
        kind = state.kinds.of(intent)
        assert DesiredState._compute_entries(intent, kind) == all_entries(state, intent)
    # what the reconciler reads to follow a key's prerequisites: each needed key and
    # who needs it, as the kinds say
    expected: dict[Hashable, set[str]] = {}
    for intent in state.intents.values():
        for needed in state.kinds.of(intent).needs(intent):
            expected.setdefault(needed, set()).add(intent.key)
    assert {k: set(v) for k, v in state.needed().items()} == expected
    of = {kind: {i.key for i in state.of_kind(kind)} for kind in ("plug", "wire", "attach")}
    assert expected["br/v-net-0"] == of["plug"] | of["attach"]
    assert expected["ns/red"] == of["plug"] | of["wire"]
    assert expected["ns/blue"] == of["wire"]
