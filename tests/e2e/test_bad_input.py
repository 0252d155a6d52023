"""Every bad input: a clear one-line error, a non-zero exit, and nothing changed."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.daemon import Daemon
from tests.support.topology import build_seed, desired

pytestmark = pytest.mark.e2e

# (arguments, exit status, a fragment the message must hold)
CASES: list[tuple[list[str], int, str]] = [
    (
        ["plug", "grey", "v-net-0", "--address", "192.168.15.9/24"],
        3,
        "namespace grey does not exist",
    ),
    (
        ["plug", "red", "br-nope", "--address", "192.168.15.9/24"],
        3,
        "bridge br-nope does not exist",
    ),
    (["bridge", "del", "br-nope"], 3, "does not exist"),
    (["ns", "del", "nope"], 3, "not managed"),
    (["unforward", "81"], 3, "not forwarded"),
    (["ns", "add", "a-very-long-name-x"], 2, "at most 15"),
    (["ns", "add", "red blue"], 2, "characters"),
    (["ns", "add", "--", "-flush"], 2, "characters"),
    (["ns", "add", "a;reboot"], 2, "characters"),
    (["bridge", "add", "br1", "--address", "10.1.1.1"], 2, "no prefix length"),
    (["bridge", "add", "br1", "--address", "10.1.1.300/24"], 2, "not a valid CIDR"),
    (["plug", "blue", "v-net-0", "--address", "abc/24"], 2, "not a valid CIDR"),
    (["plug", "blue", "v-net-0", "--address", "192.168.15.7/24"], 4, "already plugged"),
    (["wire", "red", "10.9.0.1/24", "blue", "10.9.0.1/24"], 4, "given to both"),
    (["forward", "0", "192.168.15.2:80"], 2, "out of range"),
    (["forward", "65536", "192.168.15.2:80"], 2, "out of range"),
    (["forward", "abc", "192.168.15.2:80"], 2, "not a number"),
    (["forward", "81", "192.168.15.2:0"], 2, "out of range"),
    (["forward", "81", "192.168.15.999:80"], 2, "not an IP address"),
    (["forward", "81", "192.168.15.2"], 2, "needs an address and a port"),
    (["forward", "81", "192.168.15.2:80", "--proto", "sctp"], 2, "not supported"),
    (["forward", "80", "192.168.15.3:80"], 4, "already forwarded"),
    (["ns", "del", "red"], 4, "still used"),
    (["bridge", "del", "v-net-0"], 4, "still used"),
    (["attach", "add", "tap[", "v-net-0"], 2, "pattern"),
]


def kernel_snapshot(d: Daemon) -> tuple[str, str, str, str]:
    return (
        d.sh("ip", "netns", "list").stdout,
        # the operational state follows carrier and settles on its own: not a change
        re.sub(r" state [A-Z]+", "", d.sh("ip", "-o", "link").stdout),
        d.sh("nft", "list", "ruleset").stdout,
        d.sh("ip", "-4", "-n", "red", "-o", "addr").stdout,
    )


def test_bad_inputs_change_nothing(daemon: Daemon) -> None:
    build_seed(daemon)
    # green's address conflict: exists, valid, but the address is red's
    daemon.ok("ns", "add", "green")
    before_state = desired(daemon)
    before_kernel = kernel_snapshot(daemon)
    failures = []
    for args, status, fragment in [
        *CASES,
        (
            ["plug", "green", "v-net-0", "--address", "192.168.15.1/24"],
            4,
            "already used on v-net-0 by red",
        ),
    ]:
        r = daemon.ctl(*args)
        err = r.stderr.strip()
        if r.returncode != status or fragment not in err or len(err.splitlines()) != 1:
            failures.append(f"{args}: exit {r.returncode} (want {status}): {err!r}")
    assert not failures, "\n".join(failures)
    assert desired(daemon) == before_state
    assert kernel_snapshot(daemon) == before_kernel


def test_messages_say_what_to_do(daemon: Daemon) -> None:
    build_seed(daemon)
    err = daemon.ctl("forward", "80", "192.168.15.3:80").stderr
    assert "unforward 80" in err  # how to retarget
    err = daemon.ctl("bridge", "add", "br1", "--address", "10.1.1.1").stderr
    assert "10.1.1.1/24" in err  # the form to use
    err = daemon.ctl("plug", "red", "br9", "--address", "10.0.0.2/24").stderr
    assert "bridge add br9" in err


def test_an_apply_document_over_the_limit_gets_the_daemons_reason(daemon: Daemon) -> None:
    doc = daemon.dir / "huge.json"
    intents = [
        {
            "kind": "forward",
            "host_ports": str(1 + i % 60000),
            "destination": "192.168.15.2:80",
            "padding": "x" * 100,
        }
        for i in range(12000)
    ]
    doc.write_text(json.dumps({"intents": intents}))
    assert doc.stat().st_size > 1 << 20
    r = daemon.ctl("apply", str(doc))
    assert r.returncode == 2, r.stderr
    assert "Broken pipe" not in r.stderr
    assert "is over 1048576 bytes" in r.stderr
