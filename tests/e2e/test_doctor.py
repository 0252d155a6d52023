"""``ctl doctor`` and ``ctl explain`` against a real host in a sandbox, on each backend:
clean, it exits 0; each problem put there by hand (a foreign nft drop, a listener on a
forwarded port, a competing DNAT, IP forwarding off) is one line naming what, who and
the fix, and doctor exits 1; ``show`` marks what is blocked (after the change, without
a periodic pass); ``forward`` warns at once; ``explain --trace`` lists the rules a real
probe hit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.net import wait_ready_line
from tests.support.topology import BACKENDS, build_seed, show
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("daemon", BACKENDS, indirect=True)]

LISTEN = (
    "import socket,sys\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('0.0.0.0',int(sys.argv[1]))); s.listen(1); print('ready',flush=True)\n"
    "import time\nwhile True: time.sleep(60)\n"
)


def doctor(d: Daemon) -> tuple[int, dict[str, Any]]:
    r = d.ctl("doctor", json_out=True)
    return r.returncode, json.loads(r.stdout)["result"]


def listener(d: Daemon, port: int) -> subprocess.Popen[Any]:
    proc: subprocess.Popen[Any] = d.box.popen(
        [sys.executable, "-c", LISTEN, str(port)], stdout=subprocess.PIPE, text=True
    )
    wait_ready_line(proc, f"a listener on {port}")
    return proc


def state_of(d: Daemon, key: str) -> str:
    return str(next(i for i in show(d)["intents"] if i["key"] == key)["state"])


def test_doctor_finds_what_breaks_netagent_and_exits_accordingly(daemon: Daemon) -> None:
    d = daemon
    build_seed(d)
    code, clean = doctor(d)
    assert code == 0, clean
    assert clean["problems"] == 0 and "drops" in clean["checked"]
    assert "ok: nothing found" in d.ok("doctor")

    # someone else's nft table drops what goes into the bridge
    d.sh("nft", "add", "table", "inet", "filter")
    d.sh(
        "nft",
        "add",
        "chain",
        "inet",
        "filter",
        "forward",
        "{ type filter hook forward priority 0; policy accept; }",
    )
    d.sh("nft", "add", "rule", "inet", "filter", "forward", "oifname", "v-net-0", "drop")
    # show follows another tool's change without a periodic pass
    wait_for("fwd/tcp/80 blocked in show", lambda: state_of(d, "fwd/tcp/80") == "blocked")
    # a listener on a forwarded port, a competing DNAT of another
    held = listener(d, 8090)
    d.ok("forward", "8090", "192.168.15.2:80")
    d.sh(
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "8091",
        "-j",
        "DNAT",
        "--to-destination",
        "10.9.9.9:80",
    )
    # the daemon reads the host again after another tool's change (within 0.5 s): wait
    # for that reading, which is what `forward` consults for other tools' DNATs
    changed = time.time()
    wait_for(
        "the findings read after the DNAT was added",
        lambda: (d.status()["findings"]["checked"] or 0) > changed,
    )
    warned = d.ctl("forward", "8091", "192.168.15.2:80")
    assert warned.returncode == 0
    assert "warning: problem: host port 8091/tcp of fwd/tcp/8091 is also DNATed" in warned.stderr
    d.sh("sysctl", "-qw", "net.ipv4.ip_forward=0")

    code, found = doctor(d)
    assert code == 1
    lines = [f["line"] for f in found["findings"]]
    text = "\n".join(lines)
    assert "dropped by chain forward of nft table inet filter rule" in text
    assert 'oifname "v-net-0" drop' in text
    assert f"(pid {held.pid}) listens on 0.0.0.0:8090/tcp" in text
    assert "8091/tcp of fwd/tcp/8091 is also DNATed by chain PREROUTING of the nat table" in text
    assert "IP forwarding (IPv4) is off" in text and "sysctl -w net.ipv4.ip_forward=1" in text
    assert all(f["fix"] for f in found["findings"] if f["severity"] == "problem"), lines
    plain = d.ctl("doctor")
    assert plain.returncode == 1 and len(plain.stdout.splitlines()) == len(lines) + 1
    d.box.stop(held)


def test_explain_walks_the_path_and_traces_a_real_probe(daemon: Daemon) -> None:
    d = daemon
    build_seed(d)
    out = d.ctl_json("explain", "80", "--from", "192.168.15.1")
    assert out["forward"] == "fwd/tcp/80" and out["verdict"] == "delivered"
    whats = [s["what"] for s in out["steps"]]
    assert any("namespace blue, interface veth-blue" in w for w in whats)
    assert any(w.startswith("hairpin") for w in whats)
    assert any("default route via 192.168.15.5" in w for w in whats)
    none = d.ctl_json("explain", "81")
    assert none["verdict"] == "not forwarded"
    traced = d.ctl_json("explain", "80", "--from", "192.168.15.1", "--trace")
    trace = "\n".join(traced["trace"])
    assert "probe: tcp from namespace red to 192.168.15.5:80" in trace
    if d.firewall == "nftables":
        assert "inet netagent prerouting rule fib daddr type local" in trace, trace
    else:
        assert "ip nat NETAGENT-PREROUTING" in trace, trace
    assert "na_trace" not in d.sh("nft", "list", "tables").stdout  # taken away again
    plain = d.ok("explain", "80")
    assert "=> delivered (fwd/tcp/80)" in plain
