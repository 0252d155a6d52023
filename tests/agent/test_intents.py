"""Validation of user input into intents (no root)."""

import ipaddress

import pytest

from netagent.agent import errors as E
from netagent.agent import glob as G
from netagent.agent import intents as I
from netagent.agent import values as V
from netagent.agent.kinds import default_kinds


@pytest.mark.parametrize("name", ["red", "v-net-0", "a", "x" * 15, "veth_1.2"])
def test_good_names(name: str) -> None:
    assert V.check_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("x" * 16, "at most 15"),
        ("", "empty"),
        ("-flush", "characters"),
        ("red blue", "characters"),
        ("a;b", "characters"),
        ("a/b", "characters"),
        ("..", "characters"),
        ("réd", "characters"),
        ("a\nb", "characters"),
    ],
)
def test_bad_names(name: str, fragment: str) -> None:
    with pytest.raises(E.InvalidName, match=fragment):
        V.check_name(name)


def test_name_must_be_string() -> None:
    with pytest.raises(E.InvalidName):
        V.check_name(5)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("192.168.15.1", "no prefix length"),
        ("192.168.15.300/24", "not a valid CIDR"),
        ("abc", "no prefix length"),
        ("192.168.15.0/24", "network address"),
        ("192.168.15.255/24", "broadcast"),
        ("224.0.0.1/4", "cannot be assigned"),
        ("192.168.15.1/33", "not a valid CIDR"),
    ],
)
def test_bad_cidrs(text: str, fragment: str) -> None:
    with pytest.raises(E.InvalidAddress, match=fragment):
        V.parse_interface(text)


def test_good_cidrs() -> None:
    assert str(V.parse_interface("192.168.15.1/24")) == "192.168.15.1/24"
    assert V.parse_interface("fd00:15::1/64").version == 6
    assert str(V.parse_interface("10.0.0.1/31")) == "10.0.0.1/31"


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1", "", "1e3", 0, 70000, True])
def test_bad_ports(port: object) -> None:
    with pytest.raises(E.InvalidPort):
        V.parse_port(port)


def test_port_ranges() -> None:
    assert V.parse_port_range("8000-8009") == (8000, 8009)
    assert V.parse_port_range(80) == (80, 80)
    with pytest.raises(E.InvalidPort, match="backwards"):
        V.parse_port_range("90-80")


def test_destinations() -> None:
    ip, lo, hi = V.parse_destination("192.168.15.2:80")
    assert (str(ip), lo, hi) == ("192.168.15.2", 80, 80)
    ip, lo, hi = V.parse_destination("[fd00::2]:9000-9009")
    assert (str(ip), lo, hi) == ("fd00::2", 9000, 9009)
    with pytest.raises(E.InvalidAddress, match="brackets"):
        V.parse_destination("fd00::2:80")
    with pytest.raises(E.InvalidArgument, match="address and a port"):
        V.parse_destination("192.168.15.2")
    with pytest.raises(E.InvalidAddress):
        V.parse_destination("192.168.15.999:80")


def test_make_forward_ranges() -> None:
    f = I.make_forward("8000-8009", "192.168.15.2:9000-9009")
    assert f.count == 10 and f.pairs()[3] == (8003, 9003)
    assert f.key == "fwd/tcp/8000-8009"
    with pytest.raises(E.InvalidPort, match="different lengths"):
        I.make_forward("8000-8009", "192.168.15.2:9000-9001")
    with pytest.raises(E.InvalidPort, match="same length"):
        I.make_forward("8000-8009", "192.168.15.2:9000")
    # a single destination port for a single host port is fine
    assert I.make_forward("80", "192.168.15.2:8080").pairs() == [(80, 8080)]


def test_forward_keys() -> None:
    assert I.make_forward("80", "192.168.15.2:80").key == "fwd/tcp/80"
    assert I.make_forward("80", "192.168.15.2:80", "udp").key == "fwd/udp/80"
    assert I.make_forward("80", "192.168.15.2:80", host_ip="10.0.0.1").key == "fwd/tcp/80/10.0.0.1"
    assert I.make_forward("80", "[fd00::2]:80").key == "fwd/tcp/80/ipv6"
    with pytest.raises(E.InvalidAddress, match="different IP versions"):
        I.make_forward("80", "[fd00::2]:80", host_ip="10.0.0.1")


def test_intents_round_trip() -> None:
    items: list[I.Intent] = [
        I.Namespace("red"),
        I.Bridge("v-net-0", (ipaddress.ip_interface("192.168.15.5/24"),), True),
        I.Plug(
            "red",
            "v-net-0",
            (ipaddress.ip_interface("192.168.15.1/24"),),
            "veth-red",
            "veth-red-br",
        ),
        I.Wire(
            "red",
            (ipaddress.ip_interface("10.0.0.1/24"),),
            "blue",
            (ipaddress.ip_interface("10.0.0.2/24"),),
            "veth-red",
            "veth-blue",
        ),
        I.AttachRule("tap*", "v-net-0"),
        I.make_forward("8000-8001", "192.168.15.2:9000-9001", "udp", "10.0.0.1"),
    ]
    for item in items:
        assert default_kinds().from_dict(item.to_dict()) == item


def test_intent_from_dict_rejects_garbage() -> None:
    with pytest.raises(E.InvalidArgument):
        default_kinds().from_dict({"kind": "nope"})
    with pytest.raises(E.InvalidArgument):
        default_kinds().from_dict([1, 2])
    with pytest.raises(E.NetagentError):
        default_kinds().from_dict({"kind": "ns", "name": 7})


def test_masquerade_needs_address() -> None:
    with pytest.raises(E.InvalidArgument, match="--masquerade needs --address"):
        I.Bridge("br0", (), True)


@pytest.mark.parametrize(
    ("pattern", "name", "hit"),
    [
        ("veth-*-br", "veth-red-br", True),
        ("veth-*-br", "veth-red", False),
        ("tap*", "tap0", True),
        ("tap?", "tap10", False),
        ("tap[0-3]", "tap2", True),
        ("tap[!0-3]", "tap2", False),
        ("*", "anything", True),
        ("*", "a:b@c", True),  # a star stands for any characters
        ("a?b", "a:b", False),  # a question mark for one of the pattern alphabet's
        ("a[!-_.a-zA-Z0-9]", "ab", False),  # a class of nothing
        ("veth-*-br", "veth--br", True),
        ("a*b*c", "aXbYbZc", True),
    ],
)
def test_glob_match(pattern: str, name: str, hit: bool) -> None:
    assert G.glob_match(pattern, name) is hit


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("veth-*-br", "tap*", False),
        ("veth-*", "*-br", True),
        ("tap[0-3]", "tap[4-9]", False),
        ("tap?", "tap1*", True),
        ("a*b", "a*c", False),
        ("*", "x", True),
        ("eth0", "eth0", True),
    ],
)
def test_patterns_overlap(a: str, b: str, overlap: bool) -> None:
    assert G.patterns_overlap(a, b) is overlap
    assert G.patterns_overlap(b, a) is overlap


@pytest.mark.parametrize("pattern", ["", "-x*", "tap[", "a b", "a;b", "x]"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(E.InvalidPattern):
        G.check_pattern(pattern)


@pytest.mark.parametrize(
    "text", ["1", "80", "080", "00080", "65535", "0", "65536", "99999", "123456", "", "\u0663"]
)
def test_one_port_as_text_reads_as_the_number_does(text: str) -> None:
    """The text of one port takes a short path through the parsers: it must give what
    the number gives, and refuse what the number's path refuses."""
    ip = ipaddress.ip_address("192.168.15.2")
    n = int(text) if text.isascii() and text.isdigit() else None
    if n is not None and 1 <= n <= 65535:
        assert V.parse_port_range(text) == V.parse_port_range(n) == (n, n)
        assert V.parse_host_ports(text) == (n, 1)
        assert V.parse_destination(f"192.168.15.2:{text}") == (ip, n, n)
        return
    if n is not None:
        with pytest.raises(E.InvalidPort):
            V.parse_port_range(n)
    with pytest.raises(E.InvalidPort):
        V.parse_port_range(text)
    with pytest.raises(E.InvalidPort):
        V.parse_host_ports(text)
    with pytest.raises(E.InvalidPort):
        V.parse_destination(f"192.168.15.2:{text}")


def test_a_forward_takes_numbers_only() -> None:
    f = I.make_forward("80", "192.168.15.2:8080")
    for field, value in (("host_port", "80"), ("dest_port", "8080"), ("count", True)):
        with pytest.raises(E.InvalidPort):
            type(f)(**{**f.__dict__, field: value})
    with pytest.raises(E.InvalidPort, match="out of range"):
        type(f)(**{**f.__dict__, "host_port": 0})
    with pytest.raises(E.InvalidArgument, match="protocol"):
        type(f)(**{**f.__dict__, "proto": "sctp"})


def test_addresses_read_from_text_are_checked_each_time() -> None:
    """Addresses are cached by their text: a refused one is refused again, and a host
    address allowed for --host-ip is not thereby allowed as a destination."""
    assert V.parse_host_ip("127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    for _ in range(2):
        with pytest.raises(E.InvalidAddress, match="host itself"):
            V.parse_ip("127.0.0.1", "destination address")
        with pytest.raises(E.InvalidAddress, match="not an IP address"):
            V.parse_ip("192.168.15.999")
    assert V.parse_ip("192.168.15.2") is V.parse_ip("192.168.15.2")
