"""Requests declared once: ``Request.parse`` (the socket's JSON) and ``Request.from_argv``
(the CLI's words) for each op's fields."""

from __future__ import annotations

import ipaddress
from itertools import chain
from typing import Any

import pytest

from netagent.agent import ops
from netagent.agent.errors import BadRequest, InvalidName, NetagentError
from netagent.agent.schema import Field, Request

#: a valid CLI word for each kind of value
WORD = {
    "name": "red",
    "cidrs": "192.168.15.1/24",
    "ip": "10.0.0.1",
    "host_ip": "10.0.0.1",
    "ports": "8000-8009",
    "destination": "192.168.15.2:9000-9009",
    "proto": "udp",
    "pattern": "veth-*-br",
    "list": "topology.json",
    "netns": "/proc/1234/ns/net",
    "pid": "1234",
    "text": "ADD",
}
#: what it parses to
PARSED: dict[str, Any] = {
    "name": "red",
    "cidrs": (ipaddress.ip_interface("192.168.15.1/24"),),
    "ip": ipaddress.ip_address("10.0.0.1"),
    "host_ip": ipaddress.ip_address("10.0.0.1"),
    "ports": (8000, 10),
    "destination": (ipaddress.ip_address("192.168.15.2"), 9000, 9009),
    "proto": "udp",
    "pattern": "veth-*-br",
    "netns": "/proc/1234/ns/net",
    "pid": 1234,
    "text": "ADD",
}
WITH_FIELDS = [r for r in ops.REQUESTS if r.fields]
#: the requests a command line can make (``cni`` is the CNI plugin's alone)
CLI_FIELDS = [r for r in WITH_FIELDS if r.cli]


def full_argv(req: type[Request]) -> tuple[list[str], dict[str, Any]]:
    """Every field of a request given on a command line, and the arguments it means."""
    argv: list[str] = []
    want: dict[str, Any] = {}
    for f in req.fields:
        if f.is_flag:
            assert f.flag is not None
            argv.append(f.flag)
            want[f.name] = True
        elif f.flag is not None:
            argv += [f.flag, WORD[f.value.parser]]
            want[f.name] = [WORD[f.value.parser]] if f.many else WORD[f.value.parser]
        else:
            argv.append(WORD[f.value.parser])
            want[f.name] = WORD[f.value.parser]
    return argv, want


@pytest.mark.parametrize("req", CLI_FIELDS, ids=lambda r: r.op)
def test_every_field_of_every_op_from_the_command_line(req: type[Request]) -> None:
    argv, want = full_argv(req)
    assert req.from_argv(argv) == want
    if req is ops.Apply:
        return  # the CLI reads the file and sends its intents (cli/ctl.py)
    parsed = req.parse(want)
    for f in req.fields:
        value = getattr(parsed, f.name)
        assert value == (True if f.is_flag else PARSED[f.value.parser]), f.name


def words_of(fields: list[Field[Any]]) -> list[list[str]]:
    return [[f.flag, WORD[f.value.parser]] if f.flag else [WORD[f.value.parser]] for f in fields]


@pytest.mark.parametrize("req", CLI_FIELDS, ids=lambda r: r.op)
def test_what_may_be_left_out_and_what_may_not(req: type[Request]) -> None:
    required = [f for f in req.fields if f.required]
    # a positional left out needs an option that says it instead (plug --netns PATH BR)
    named = {f.instead[0] for f in req.fields if f.instead}
    chosen = [f for f in req.fields if f.name in named]
    words = words_of(required + chosen)
    args: dict[str, Any] = {
        f.name: [WORD[f.value.parser]] if f.many else WORD[f.value.parser]
        for f in required + chosen
    }
    assert req.from_argv(list(chain.from_iterable(words))) == args
    if req is ops.Apply:
        args["intents"] = []
    parsed = req.parse(args)
    for f in req.fields:
        if not f.required and f not in chosen:
            # a repeatable option left out is its parser's empty value
            assert getattr(parsed, f.name) == (() if f.many else f.default), f.name
    for i, f in enumerate(required + chosen):
        if f in required:
            with pytest.raises(BadRequest, match=f"missing argument '{f.name}'"):
                req.parse({k: v for k, v in args.items() if k != f.name})
        assert req.from_argv(list(chain.from_iterable(words[:i] + words[i + 1 :]))) is None


# ---- the socket's side --------------------------------------------------------------
def test_parse_reads_aliases_of_fields() -> None:
    one = ops.BridgeAdd.parse({"name": "br0", "address": "10.0.0.1/24"})
    many = ops.BridgeAdd.parse({"name": "br0", "addresses": ["10.0.0.1/24", "fd00::1/64"]})
    assert one.addresses == (ipaddress.ip_interface("10.0.0.1/24"),)
    assert [str(a) for a in many.addresses] == ["10.0.0.1/24", "fd00::1/64"]
    # the field's own name wins over its alias
    both = ops.PlugAdd.parse(
        {"ns": "red", "bridge": "br0", "addresses": ["10.0.0.2/24"], "address": "10.0.0.3/24"}
    )
    assert [str(a) for a in both.addresses] == ["10.0.0.2/24"]


def test_parse_refuses_what_it_does_not_know_and_types_it_cannot_read() -> None:
    with pytest.raises(BadRequest, match="unknown argument 'nmae'; known: name"):
        ops.NsAdd.parse({"nmae": "red"})
    with pytest.raises(BadRequest, match="known: none"):
        ops.Status.parse({"verbose": True})
    with pytest.raises(BadRequest, match="missing argument 'bridge'"):
        ops.PlugAdd.parse({"ns": "red", "addresses": []})
    # addresses left out (or empty) are leased by the plug kind
    assert ops.PlugAdd.parse({"ns": "red", "bridge": "br0", "addresses": []}).addresses == ()
    with pytest.raises(InvalidName):
        ops.NsAdd.parse({"name": ["red"]})
    codes: dict[str, int] = {}
    cases: dict[str, dict[str, object]] = {
        "bool": {"name": "br0", "masquerade": 1},
        "cidr": {"name": "br0", "addresses": "10.0.0.1/33"},
        "two ipv4": {"name": "br0", "addresses": ["10.0.0.1/24", "10.0.1.1/24"]},
    }
    for label, args in cases.items():
        with pytest.raises(NetagentError) as exc:
            ops.BridgeAdd.parse(args)
        codes[label] = exc.value.code
    assert codes == {"bool": 2001, "cidr": 2003, "two ipv4": 2003}


def test_parse_gives_typed_values_and_defaults() -> None:
    fwd = ops.ForwardAdd.parse({"host_ports": 80, "destination": "[fd00::2]:8080"})
    assert fwd.host_ports == (80, 1)
    assert fwd.destination == (ipaddress.ip_address("fd00::2"), 8080, 8080)
    assert (fwd.proto, fwd.host_ip) == ("tcp", None)
    bridge = ops.BridgeAdd.parse({"name": "br0"})
    assert (bridge.addresses, bridge.masquerade) == ((), False)
    assert ops.Apply.parse({"intents": []}).prune is False
    assert ops.Links.parse({}).ns is None
    # one parsed value: equal requests are equal, and hash alike
    assert ops.NsAdd.parse({"name": "red"}) == ops.NsAdd.parse({"name": "red"})
    assert len({ops.NsAdd.parse({"name": "red"}), ops.NsAdd.parse({"name": "red"})}) == 1
    assert ops.NsAdd.parse({"name": "red"}) != ops.NsDel.parse({"name": "red"})


def test_old_op_names_are_the_same_requests() -> None:
    for old, new in [
        ("fwd.add", "forward.add"),
        ("fwd.del", "forward.del"),
        ("fwd.list", "forward.list"),
        ("rule.add", "attach.add"),
        ("rule.del", "attach.del"),
        ("rule.list", "attach.list"),
    ]:
        assert ops.BY_OP[old] is ops.BY_OP[new]
    assert ops.BY_KIND["fwd"] is ops.ForwardAdd and ops.BY_KIND["br"] is ops.BridgeAdd
    assert ops.BY_KIND["rule"] is ops.AttachAdd


# ---- the CLI's side -----------------------------------------------------------------
def test_repeatable_options_and_inline_values() -> None:
    assert ops.BridgeAdd.from_argv(
        ["br0", "--address", "10.0.0.1/24", "--address=fd00::1/64", "--masquerade"]
    ) == {"name": "br0", "addresses": ["10.0.0.1/24", "fd00::1/64"], "masquerade": True}
    assert ops.PlugAdd.from_argv(["red", "br0", "--address=10.0.0.2/24", "--ifname", "eth0"]) == {
        "ns": "red",
        "bridge": "br0",
        "addresses": ["10.0.0.2/24"],
        "ifname": "eth0",
    }
    # options go anywhere between the words
    assert ops.ForwardAdd.from_argv(
        ["--proto", "udp", "53", "--host-ip", "10.0.0.1", "10.0.0.2:53"]
    ) == {
        "host_ports": "53",
        "destination": "10.0.0.2:53",
        "proto": "udp",
        "host_ip": "10.0.0.1",
    }
    # after --, everything is a word (a pattern may not start with '-', but typer says so)
    assert ops.AttachAdd.from_argv(["--", "-x*", "br0"]) == {"pattern": "-x*", "bridge": "br0"}


@pytest.mark.parametrize(
    ("req", "argv"),
    [
        (ops.NsAdd, []),  # a word missing
        (ops.NsAdd, ["red", "blue"]),  # a word too many
        (ops.NsAdd, ["red", "--colour", "red"]),  # an unknown option
        (ops.NsAdd, ["-n", "red"]),  # a short option
        (ops.BridgeAdd, ["br0", "--masquerade=yes"]),  # a flag with a value
        (ops.BridgeAdd, ["br0", "--address"]),  # an option without its value
        (ops.ForwardAdd, ["80", "10.0.0.2:80", "--proto", "udp", "--proto", "tcp"]),  # twice
        (ops.PlugAdd, ["red"]),  # a required argument left out
        (ops.Status, ["now"]),
    ],
)
def test_lines_that_are_not_plainly_valid_go_to_typer(req: type[Request], argv: list[str]) -> None:
    assert req.from_argv(argv) is None


def test_from_argv_does_not_validate_values() -> None:
    """It only splits words; the daemon's parse says what is wrong with a value (one
    place for each error message)."""
    args = ops.NsAdd.from_argv(["bad/name"])
    assert args == {"name": "bad/name"}
    with pytest.raises(InvalidName):
        ops.NsAdd.parse(args)


@pytest.mark.parametrize("req", [r for r in ops.REQUESTS if not r.fields], ids=lambda r: r.op)
def test_ops_without_fields_take_no_words(req: type[Request]) -> None:
    assert req.from_argv([]) == {}
    assert req.from_argv(["x"]) is None
    assert req.parse({}) == req()


def test_an_apply_entrys_kind_is_ignored_only_when_asked() -> None:
    entry = {"kind": "fwd", "host_ports": "80", "destination": "192.168.15.2:80"}
    req = ops.ForwardAdd.parse(entry, ignore="kind")
    assert req.host_ports == (80, 1) and req.proto == "tcp" and req.host_ip is None
    assert req == ops.ForwardAdd.parse({k: v for k, v in entry.items() if k != "kind"})
    with pytest.raises(BadRequest, match="unknown argument 'kind'"):
        ops.ForwardAdd.parse(entry)
