"""The one attach decision: what a rule takes, and what it never takes (pure, no root)."""

from __future__ import annotations

from netagent.agent.kinds.attach import AttachRule, decide
from netagent.agent.linkcache import LinkCache
from netagent.backends.netlink import NETAGENT_GROUP, Link

BR, THEIRS, UPLINK = 2, 3, 4


def cache(*extra: Link) -> LinkCache:
    c = LinkCache()
    c.reset(
        [
            Link(1, "lo", None, up=True),
            Link(BR, "v-net-0", "bridge", up=True, alias="netagent:br/v-net-0"),
            Link(THEIRS, "docker0", "bridge", up=True),
            Link(UPLINK, "eth0", None, up=True),
            *extra,
        ]
    )
    c.addressed[UPLINK] = {bytes([203, 0, 113, 1])}
    return c


def why(link: Link, c: LinkCache, pattern: str = "*") -> str | None:
    verdict = decide([AttachRule(pattern, "v-net-0")], link, c)
    return None if verdict.attach else (verdict.why or "nothing")


def test_a_free_veth_matching_the_rule_is_taken() -> None:
    tap = Link(10, "tap0", "tun", up=False)
    assert why(tap, cache(tap)) is None


def test_star_never_takes_the_hosts_addressed_uplink_lo_bridges_or_netagents_own() -> None:
    c = cache()
    assert "carries addresses of the host" in (why(c.named("eth0"), c) or "")  # type: ignore[arg-type]
    assert why(c.named("lo"), c) == "nothing"  # type: ignore[arg-type]
    assert why(c.named("docker0"), c) == "nothing"  # type: ignore[arg-type]
    own = Link(11, "veth-red-br", "veth", alias="netagent:plug/red/v-net-0")
    assert why(own, cache(own)) == "nothing"
    marked = Link(12, "na0123", "veth", group=NETAGENT_GROUP)
    assert why(marked, cache(marked)) == "nothing"


def test_a_physical_interface_only_when_named_exactly() -> None:
    nic = Link(13, "enp1s0", None, up=True)
    c = cache(nic)
    assert "physical" in (why(nic, c, "enp*") or "")
    assert why(nic, c, "enp1s0") is None


def test_a_veth_whose_peer_is_on_another_bridge_is_left_alone() -> None:
    inside = Link(20, "veth-a", "veth", up=True, master=THEIRS, peer=21)
    outside = Link(21, "veth-b", "veth", up=False, peer=20)
    c = cache(inside, outside)
    assert "would join docker0 to v-net-0" in (why(outside, c, "veth-*") or "")


def test_the_second_end_of_a_pair_whose_first_is_on_the_bridge_is_left_alone() -> None:
    first = Link(30, "tapA", "veth", up=True, master=BR, peer=31)
    second = Link(31, "tapB", "veth", peer=30)
    c = cache(first, second)
    assert "loop" in (why(second, c, "tap*") or "")


def test_one_enslaved_elsewhere_is_left_alone_and_one_detached_is_taken_again() -> None:
    held = Link(40, "tap9", "tun", up=True, master=THEIRS)
    c = cache(held)
    assert "already enslaved to docker0" in (why(held, c, "tap*") or "")
    detached = Link(41, "tap8", "tun", up=True, master=None)
    assert why(detached, cache(detached), "tap*") is None


def test_the_cache_learns_a_veths_peer_the_kernel_announced_before_its_pair() -> None:
    """``ip link add in-theirs type veth peer name out-theirs`` announces out-theirs
    first, peerless (``out-theirs@NONE``), and never again: the cache pairs it from
    in-theirs' announcement, so the loop check sees the pair as a lookup would."""
    c = cache()
    c.update(Link(20, "out-theirs", "veth"))
    c.update(Link(21, "in-theirs", "veth", peer=20))
    assert c.get(20).peer == 21  # type: ignore[union-attr]
    c.update(Link(21, "in-theirs", "veth", peer=20, master=THEIRS))
    verdict = why(c.get(20), c)  # type: ignore[arg-type]
    assert verdict is not None and "would join docker0 to v-net-0" in verdict
    # one end moved to another namespace: the other stays, without a peer here
    c.remove(21)
    assert c.get(20).peer is None  # type: ignore[union-attr]
    # a veth whose peer is in another namespace is not paired with a local index
    c.update(Link(30, "host-end", "veth", link_netnsid=1))
    c.update(Link(31, "x", "veth", peer=30))
    assert c.get(30).peer is None  # type: ignore[union-attr]
