"""The doctor's per-forward cache (``agent/findings.py``, ``ForwardMemo``): a forward's
checks are computed once while the host's reading and the bridges' networks stay, again
when the forward or either of those changes; forwards gone are forgotten (no root)."""

from __future__ import annotations

import ipaddress
from typing import Any

from netagent.agent.findings import Desired, ForwardMemo, Fwd, PerForward


def fwd(key: str, port: int, dest: str = "10.0.0.2") -> Fwd:
    return (key, "tcp", 4, range(port, port + 1), ipaddress.ip_address(dest), 80)


def desired(*forwards: Fwd, net: str = "10.0.0.0/24") -> Desired:
    d = Desired(forwards=list(forwards))
    d.bridges["br0"] = ("br/br0", [ipaddress.ip_network(net)], [], [])
    return d


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> PerForward:
        self.calls += 1
        return [], {f"policy {self.calls}"}


def test_a_forward_is_checked_once_while_nothing_it_depends_on_changes() -> None:
    memo, compute = ForwardMemo(), Counter()
    view: Any = object()
    a = fwd("fwd/tcp/80", 80)
    memo.begin(view, desired(a))
    first = memo.get("drops", a, compute)
    assert memo.get("drops", a, compute) is first and compute.calls == 1
    memo.get("listeners", a, compute)  # another check: its own result
    assert compute.calls == 2
    memo.end()
    memo.begin(view, desired(a))  # the same reading: kept
    assert memo.get("drops", a, compute) is first and compute.calls == 2
    memo.get("drops", fwd("fwd/tcp/80", 80, "10.0.0.3"), compute)  # the forward changed
    assert compute.calls == 3


def test_a_new_reading_or_other_networks_start_afresh() -> None:
    memo, compute = ForwardMemo(), Counter()
    a = fwd("fwd/tcp/80", 80)
    view: Any = object()
    memo.begin(view, desired(a))
    memo.get("drops", a, compute)
    memo.begin(view, desired(a, net="10.9.0.0/24"))
    memo.get("drops", a, compute)
    other: Any = object()
    memo.begin(other, desired(a, net="10.9.0.0/24"))
    memo.get("drops", a, compute)
    assert compute.calls == 3


def test_forwards_no_longer_desired_are_forgotten() -> None:
    memo, compute = ForwardMemo(), Counter()
    view: Any = object()
    many = [fwd(f"fwd/tcp/{p}", p) for p in range(100, 110)]
    memo.begin(view, desired(*many))
    for f in many:
        memo.get("drops", f, compute)
    memo.end()
    memo.begin(view, desired(many[0]))  # nine removed: more than 3x what is desired
    memo.end()
    memo.begin(view, desired(*many))
    for f in many:
        memo.get("drops", f, compute)
    assert compute.calls == 10 + 9  # the one kept was not computed again
