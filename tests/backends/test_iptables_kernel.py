"""The iptables backend against the real kernel, in a throwaway sandbox per test.

Every command that touches iptables runs inside the sandbox (its own network namespace),
never on the host: the backend is driven by ``DRIVER``, a small script executed in the
sandbox with one JSON request as its argument, and the tests read the result back with
``iptables-save`` run in the same sandbox.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

import pytest

from netagent.agent import intents as I
from netagent.backends.firewall import FirewallSpec
from netagent.cli.sandbox import Sandbox
from tests.support.net import wait_ready_line

pytestmark = pytest.mark.privileged

DRIVER = r"""
import json, sys
import anyio
from netagent.agent.errors import NetagentError
from netagent.agent.kinds import default_kinds
from netagent.backends.firewall import FirewallSpec
from netagent.backends.iptables import IptablesBackend

req = json.loads(sys.argv[1])
KINDS = default_kinds()
spec = FirewallSpec(
    forwards=tuple(KINDS.from_dict(f) for f in req["spec"]["forwards"]),
    bridges=tuple(KINDS.from_dict(b) for b in req["spec"]["bridges"]),
)

async def main():
    be = IptablesBackend()
    op = req["op"]
    out = {"ok": True}
    try:
        if op in ("plan", "sync"):
            batch = be.plan(spec, await be.observe())
            if op == "sync":
                await be.apply(batch)
            out.update(steps=batch.steps, full=batch.rebuild, touched=sorted(batch.touched))
        elif op == "update":
            added = [KINDS.from_dict(f) for f in req["added"]]
            removed = [KINDS.from_dict(f) for f in req["removed"]]
            batch = be.plan_update(spec, added, removed)
            await be.apply(batch)
            out.update(steps=batch.steps)
        elif op == "purge":
            out["removed"] = await be.purge()
        elif op == "present":
            out["present"] = (await be.observe()).present
        elif op == "probe":
            out["probe"] = list(IptablesBackend.probe())
        elif op == "remember":
            # how many times iptables-save runs: observe, apply, observe, an update,
            # observe, then someone else's change, observe
            saves = []
            real = be.programs.run

            async def counting(argv, stdin=None):
                if argv[0].endswith("-save"):
                    saves.append(argv[0])
                return await real(argv, stdin)

            be.programs.run = counting
            counts = []
            batch = be.plan(spec, await be.observe())
            await be.apply(batch)
            counts.append(len(saves))
            observed = await be.observe()
            out["in_sync"] = be.plan(spec, observed).empty
            counts.append(len(saves))
            added = [KINDS.from_dict(f) for f in req["added"]]
            grown = FirewallSpec(forwards=(*spec.forwards, *added), bridges=spec.bridges)
            await be.apply(be.plan_update(grown, added, []))
            out["update_in_sync"] = be.plan(grown, await be.observe()).empty
            counts.append(len(saves))
            import subprocess
            subprocess.run(["iptables", "-t", "nat", "-F", "NETAGENT-DNAT"], check=True)
            out["after_flush"] = be.plan(grown, await be.observe()).steps
            counts.append(len(saves))
            out["saves"] = counts
    except NetagentError as exc:
        out = {"ok": False, "error": exc.message}
    print(json.dumps(out))

anyio.run(main)
"""

V_NET_0 = I.Bridge(
    "v-net-0",
    (ipaddress.ip_interface("192.168.15.5/24"), ipaddress.ip_interface("fd00:15::1/64")),
    masquerade=True,
)
FWD80 = I.make_forward("80", "192.168.15.2:80")
FWD_RANGE = I.make_forward("8000-8001", "192.168.15.3:9000-9001", "udp")
FWD_BOUND = I.make_forward("81", "10.0.0.9:81", host_ip="10.0.0.1")
FWD6 = I.make_forward("80", "[fd00:15::2]:8080")
SPEC = FirewallSpec(forwards=(FWD80, FWD_RANGE, FWD_BOUND, FWD6), bridges=(V_NET_0,))

JUMP = '-m comment --comment "netagent:jump" -j NETAGENT-'
USER_RULE = "-A POSTROUTING -s 10.9.9.0/24 -j MASQUERADE"


def drive(
    box: Sandbox,
    op: str,
    spec: FirewallSpec = SPEC,
    added: Iterable[I.Forward] = (),
    removed: Iterable[I.Forward] = (),
) -> dict[str, Any]:
    """Run one backend operation inside the sandbox; its JSON answer."""
    request = {
        "op": op,
        "spec": {
            "forwards": [f.to_dict() for f in spec.forwards],
            "bridges": [b.to_dict() for b in spec.bridges],
        },
        "added": [f.to_dict() for f in added],
        "removed": [f.to_dict() for f in removed],
    }
    result = box.run([sys.executable, "-c", DRIVER, json.dumps(request)])
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def save(box: Sandbox, family: int = 4) -> list[str]:
    """The nat table's rules and chain declarations, from inside the sandbox."""
    program = "iptables-save" if family == 4 else "ip6tables-save"
    out = box.run([program, "-t", "nat"]).stdout
    return [line for line in out.splitlines() if line.startswith(("-A ", ":"))]


def ours(lines: list[str]) -> list[str]:
    return [line for line in lines if "NETAGENT" in line]


def add_user_rules(box: Sandbox) -> None:
    """Rules netagent must never touch: a masquerade, a chain, a rule borrowing our
    comment, and the same in IPv6."""
    box.run(["iptables", "-t", "nat", *USER_RULE.split()])
    box.run(["iptables", "-t", "nat", "-N", "USER-CHAIN"])
    box.run(["iptables", "-t", "nat", "-A", "USER-CHAIN", "-p", "tcp", "--dport", "22",
             "-j", "DNAT", "--to-destination", "10.9.9.2:22"])  # fmt: skip
    box.run(["iptables", "-t", "nat", "-A", "PREROUTING", "-m", "comment",
             "--comment", "netagent:jump", "-j", "USER-CHAIN"])  # fmt: skip
    box.run(["ip6tables", "-t", "nat", "-A", "POSTROUTING", "-s", "fd09::/64",
             "-j", "MASQUERADE"])  # fmt: skip


def user_lines(box: Sandbox) -> tuple[list[str], list[str]]:
    return (
        [line for line in save(box, 4) if "NETAGENT" not in line],
        [line for line in save(box, 6) if "NETAGENT" not in line],
    )


def test_apply_is_idempotent_and_purge_leaves_the_rest(sandbox: Sandbox) -> None:
    add_user_rules(sandbox)
    before = user_lines(sandbox)
    ok, why = drive(sandbox, "probe")["probe"]
    assert ok, why
    assert not drive(sandbox, "present")["present"]

    first = drive(sandbox, "sync")
    assert first["ok"], first
    assert first["full"]
    assert "add DNAT 80/tcp -> 192.168.15.2:80" in first["steps"]

    v4 = save(sandbox, 4)
    for chain in ("PREROUTING", "OUTPUT", "POSTROUTING"):
        assert v4.count(f"-A {chain} {JUMP}{chain}") == 1
        assert f":NETAGENT-{chain} - [0:0]" in v4
    # the jump is first in PREROUTING, ahead of the user's own rule
    assert next(line for line in v4 if line.startswith("-A PREROUTING")).endswith(
        "NETAGENT-PREROUTING"
    )
    for chain in ("PREROUTING", "OUTPUT"):
        assert [line for line in v4 if line.startswith(f"-A NETAGENT-{chain} ")] == [
            f"-A NETAGENT-{chain} -m addrtype ! --dst-type LOCAL "
            '-m comment --comment "netagent:local-only" -j RETURN',
            f'-A NETAGENT-{chain} -m comment --comment "netagent:forwards" -j NETAGENT-DNAT',
        ]
    assert (
        "-A NETAGENT-DNAT -p tcp -m tcp --dport 0:4095 "
        '-m comment --comment "netagent:ports/tcp/0-4095" -j NETAGENT-TCP-0-4095'
    ) in v4
    assert (
        "-A NETAGENT-TCP-0-4095 -p tcp -m tcp --dport 64:127 "
        '-m comment --comment "netagent:ports/tcp/64-127" -j NETAGENT-TCP-64-127'
    ) in v4
    assert (
        "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 80 "
        '-m comment --comment "netagent:fwd/tcp/80" -j DNAT --to-destination 192.168.15.2:80'
    ) in v4
    assert (
        "-A NETAGENT-TCP-64-127 -d 10.0.0.1/32 -p tcp -m tcp "
        '--dport 81 -m comment --comment "netagent:fwd/tcp/81/10.0.0.1" -j DNAT '
        "--to-destination 10.0.0.9:81"
    ) in v4
    ranged = [line for line in v4 if line.startswith("-A NETAGENT-UDP-8000-8063 ")]
    assert [line.rsplit(" ", 1)[1] for line in ranged] == [
        "192.168.15.3:9000",
        "192.168.15.3:9001",
    ]
    assert sum("-j DNAT" in line for line in v4) == 4 + 1  # once each; USER-CHAIN has one
    assert (
        "-A NETAGENT-POSTROUTING -s 127.0.0.0/8 -m conntrack --ctstate DNAT "
        '-m comment --comment "netagent:localhost" -j MASQUERADE'
    ) in v4
    assert (
        "-A NETAGENT-POSTROUTING -s 192.168.15.0/24 ! -o v-net-0 "
        '-m comment --comment "netagent:masquerade br/v-net-0 ipv4" -j MASQUERADE'
    ) in v4
    v6 = save(sandbox, 6)
    assert (
        "-A NETAGENT-TCP-64-127 -p tcp -m tcp --dport 80 "
        '-m comment --comment "netagent:fwd/tcp/80/ipv6" -j DNAT '
        "--to-destination [fd00:15::2]:8080"
    ) in v6
    assert any('"netagent:hairpin br/v-net-0 ipv6"' in line for line in v6)
    assert user_lines(sandbox) == before

    # a second pass finds everything in place and writes nothing
    second = drive(sandbox, "plan")
    assert second == {"ok": True, "steps": [], "full": False, "touched": []}
    assert drive(sandbox, "sync")["steps"] == []
    assert drive(sandbox, "present")["present"]

    removed = drive(sandbox, "purge")["removed"]
    assert "deleted chain NETAGENT-PREROUTING (ipv4, 2 rules)" in removed
    assert "deleted chain NETAGENT-UDP-8000-8063 (ipv4, 2 rules)" in removed
    assert "deleted jump POSTROUTING -> NETAGENT-POSTROUTING (ipv6)" in removed
    assert ours(save(sandbox, 4)) == []
    assert ours(save(sandbox, 6)) == []
    assert user_lines(sandbox) == before
    assert USER_RULE in before[0]
    assert not drive(sandbox, "present")["present"]
    assert drive(sandbox, "purge")["removed"] == []


def test_foreign_netagent_chains_survive_sync_rebuild_and_purge(sandbox: Sandbox) -> None:
    """Issue 9, item 5: a user's NETAGENT-MINE with its rule, and a NETAGENT-FOO that the
    user's own rule jumps to, are someone else's: a sync, a rebuild after a flush and a
    purge leave both exactly as they were, and none of them fails. A user's rule jumping
    into one of our chains does not make the purge fail either: that chain is emptied."""

    def iptables(*args: str) -> None:
        sandbox.run(["iptables", "-t", "nat", *args])

    iptables("-N", "NETAGENT-MINE")
    iptables("-A", "NETAGENT-MINE", "-p", "tcp", "--dport", "22", "-j", "RETURN")
    iptables("-N", "NETAGENT-FOO")
    iptables("-A", "NETAGENT-FOO", "-j", "NETAGENT-MINE")
    iptables("-A", "PREROUTING", "-p", "udp", "-j", "NETAGENT-FOO")
    theirs = [line for line in save(sandbox) if "MINE" in line or "FOO" in line]
    assert len(theirs) == 5, theirs

    first = drive(sandbox, "sync")
    assert first["ok"], first
    assert "-A NETAGENT-TCP-64-127" in " ".join(save(sandbox))
    iptables("-F", "NETAGENT-PREROUTING")  # drift: a rebuild of the entry chain
    assert drive(sandbox, "sync")["ok"]
    assert [line for line in save(sandbox) if "MINE" in line or "FOO" in line] == theirs

    # someone else's rule jumps into a chain of ours
    iptables("-A", "OUTPUT", "-p", "tcp", "--dport", "99", "-j", "NETAGENT-DNAT")
    purged = drive(sandbox, "purge")
    assert purged["ok"], purged
    assert any(r.startswith("left chain NETAGENT-DNAT (ipv4) empty") for r in purged["removed"])
    left = save(sandbox)
    assert [line for line in left if "MINE" in line or "FOO" in line] == theirs
    assert ":NETAGENT-DNAT - [0:0]" in left
    assert not [line for line in left if line.startswith("-A NETAGENT-DNAT")]
    assert not any("netagent:" in line for line in left)


def test_drift_is_repaired(sandbox: Sandbox) -> None:
    add_user_rules(sandbox)
    assert drive(sandbox, "sync")["ok"]
    wanted = ours(save(sandbox, 4))
    # someone deletes a rule of ours (the local-only check) and a jump, adds a duplicate
    # jump, and empties a block
    sandbox.run(["iptables", "-t", "nat", "-D", "NETAGENT-OUTPUT", "1"])
    sandbox.run(["iptables", "-t", "nat", "-D", "PREROUTING", "-m", "comment",
                 "--comment", "netagent:jump", "-j", "NETAGENT-PREROUTING"])  # fmt: skip
    sandbox.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-m", "comment",
                 "--comment", "netagent:jump", "-j", "NETAGENT-POSTROUTING"])  # fmt: skip
    sandbox.run(["iptables", "-t", "nat", "-A", "NETAGENT-POSTROUTING", "-j", "RETURN"])
    sandbox.run(["iptables", "-t", "nat", "-F", "NETAGENT-UDP-8000-8063"])

    pending = drive(sandbox, "plan")
    assert pending["full"]  # the PREROUTING jump and the OUTPUT entry chain
    assert pending["touched"] == [FWD_RANGE.key]  # its block was flushed
    assert set(pending["steps"]) == {
        "delete duplicate jump POSTROUTING -> NETAGENT-POSTROUTING (ipv4)",
        "rewrite chain NETAGENT-OUTPUT (ipv4, 2 rules)",
        "rewrite chain NETAGENT-POSTROUTING (ipv4, 3 rules)",
        "rewrite chain NETAGENT-UDP-8000-8063 (ipv4, 2 rules)",
        "add jump PREROUTING -> NETAGENT-PREROUTING (ipv4)",
        "delete rule -j RETURN",
        "add local-only",
        "add DNAT 8000/udp -> 192.168.15.3:9000",
        "add DNAT 8001/udp -> 192.168.15.3:9001",
    }
    assert drive(sandbox, "sync")["ok"]
    assert sorted(ours(save(sandbox, 4))) == sorted(wanted)
    assert drive(sandbox, "plan")["steps"] == []


def test_the_table_is_remembered_until_someone_else_changes_it(sandbox: Sandbox) -> None:
    """iptables-nft: after the first read, the backend's own changes need no read back
    (the nf_tables generation moved by exactly its own commits), and planning the same
    desired state again is free; someone else's change is noticed."""
    new = I.make_forward("443", "192.168.15.2:443")
    result = drive(sandbox, "remember", added=[new])
    assert result["ok"], result
    assert result["in_sync"] and result["update_in_sync"]
    assert result["saves"][:3] == [3, 3, 3]  # nat per family + filter, at the start only
    assert result["saves"][3] == 6  # someone else changed it: each table read again
    assert "rewrite chain NETAGENT-DNAT (ipv4, 2 rules)" in result["after_flush"]


def test_plan_update_and_the_fallback_when_a_jump_is_gone(sandbox: Sandbox) -> None:
    assert drive(sandbox, "sync")["ok"]
    new = I.make_forward("443", "192.168.15.2:443")
    grown = FirewallSpec(forwards=(*SPEC.forwards, new), bridges=SPEC.bridges)

    update = drive(sandbox, "update", grown, added=[new])
    assert update["ok"], update
    assert "add DNAT 443/tcp -> 192.168.15.2:443" in update["steps"]
    assert drive(sandbox, "plan", grown)["steps"] == []
    assert sum("--dport 443" in line for line in save(sandbox, 4)) == 1

    assert drive(sandbox, "update", SPEC, removed=[new])["ok"]
    assert drive(sandbox, "plan", SPEC)["steps"] == []
    assert not any("--dport 443" in line for line in save(sandbox, 4))

    # without its jump the update must fail whole (the reconciler then observes + plans)
    sandbox.run(["iptables", "-t", "nat", "-D", "OUTPUT", "-m", "comment",
                 "--comment", "netagent:jump", "-j", "NETAGENT-OUTPUT"])  # fmt: skip
    before = save(sandbox, 4)
    failed = drive(sandbox, "update", grown, added=[new])
    assert not failed["ok"]
    assert "iptables-restore" in failed["error"]
    assert save(sandbox, 4) == before  # atomic: nothing of the rewrite landed
    assert drive(sandbox, "sync", grown)["ok"]
    assert drive(sandbox, "plan", grown)["steps"] == []

    # the same when the path to the block the change lands in is broken, or the
    # local-only check is gone: transit traffic must never meet the forwards unchecked
    near = I.make_forward("100", "192.168.15.2:100")
    nearer = FirewallSpec(forwards=(*grown.forwards, near), bridges=SPEC.bridges)
    for breaker in (
        ["-D", "NETAGENT-TCP-0-4095", "-p", "tcp", "-m", "tcp", "--dport", "64:127",
         "-m", "comment", "--comment", "netagent:ports/tcp/64-127", "-j", "NETAGENT-TCP-64-127"],
        ["-D", "NETAGENT-PREROUTING", "1"],
    ):  # fmt: skip
        sandbox.run(["iptables", "-t", "nat", *breaker])
        before = save(sandbox, 4)
        failed = drive(sandbox, "update", nearer, added=[near])
        assert not failed["ok"]
        assert save(sandbox, 4) == before
        assert drive(sandbox, "sync", grown)["ok"]
        assert drive(sandbox, "plan", grown)["steps"] == []


# ---- real traffic ---------------------------------------------------------------------

SERVER = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(16)
print("listening", flush=True)
while True:
    conn, peer = s.accept()
    conn.sendall(f"hello {peer[0]}\n".encode())
    conn.close()
"""

CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.recv(100).decode().strip())
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print(f"error: {exc}")
"""


def connect(box: Sandbox, ns: str | None, host: str, port: int) -> str:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return box.run([*prefix, sys.executable, "-c", CLIENT, host, str(port)]).stdout.strip()


def test_traffic_through_a_forward(sandbox: Sandbox) -> None:
    """client -> host:8080 reaches srv:80 with its own address; the host's own
    127.0.0.1:8080 and a neighbour on the bridge (hairpin) arrive masqueraded; traffic
    only passing through the host is not translated; after purge nothing is."""
    sh = sandbox.run
    for argv in (
        ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ["ip", "netns", "add", "srv"],
        ["ip", "netns", "add", "nb"],
        ["ip", "netns", "add", "cli"],
        ["ip", "link", "add", "br0", "type", "bridge"],
        ["ip", "addr", "add", "192.168.15.5/24", "dev", "br0"],
        ["ip", "link", "set", "br0", "up"],
        ["sysctl", "-qw", "net.ipv4.conf.br0.route_localnet=1"],
        ["ip", "link", "add", "veth-cli", "type", "veth", "peer", "name", "eth0", "netns", "cli"],
        ["ip", "addr", "add", "10.50.0.1/24", "dev", "veth-cli"],
        ["ip", "link", "set", "veth-cli", "up"],
        ["ip", "-n", "cli", "addr", "add", "10.50.0.2/24", "dev", "eth0"],
        ["ip", "-n", "cli", "link", "set", "eth0", "up"],
        ["ip", "-n", "cli", "route", "add", "default", "via", "10.50.0.1"],
    ):
        sh(argv)
    for ns, addr in (("srv", "192.168.15.2/24"), ("nb", "192.168.15.3/24")):
        host_end = f"veth-{ns}"
        sh(["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns])
        sh(["ip", "link", "set", host_end, "master", "br0", "up"])
        sh(["ip", "-n", ns, "addr", "add", addr, "dev", "eth0"])
        sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", ns, "route", "add", "default", "via", "192.168.15.5"])
    server = sandbox.popen(
        ["ip", "netns", "exec", "srv", sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_ready_line(server, "the TCP server in srv", expect="listening")

    bridge = I.Bridge("br0", (ipaddress.ip_interface("192.168.15.5/24"),))
    spec = FirewallSpec(forwards=(I.make_forward("8080", "192.168.15.2:80"),), bridges=(bridge,))
    assert connect(sandbox, "cli", "10.50.0.1", 8080) == "refused"
    assert connect(sandbox, "cli", "192.168.15.2", 80) == "hello 10.50.0.2"  # routing works

    assert drive(sandbox, "sync", spec)["ok"]
    assert connect(sandbox, "cli", "10.50.0.1", 8080) == "hello 10.50.0.2"
    assert connect(sandbox, None, "127.0.0.1", 8080) == "hello 192.168.15.5"
    assert connect(sandbox, "nb", "192.168.15.5", 8080) == "hello 192.168.15.5"
    # not addressed to the host: passes through untranslated (srv has nothing on 8080)
    assert connect(sandbox, "cli", "192.168.15.2", 8080) == "refused"

    assert drive(sandbox, "purge", spec)["ok"]
    assert connect(sandbox, "cli", "10.50.0.1", 8080) == "refused"


# ---- the nf_tables generation and the drift watcher, against the real kernel ----------

GENID = r"""
import json, subprocess
from netagent.backends.iptables.genid import nf_genid

def run(*argv):
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)

seen = [nf_genid()]
run("iptables-save", "-t", "nat")
seen.append(nf_genid())
run("iptables", "-t", "nat", "-N", "GENID-TEST")
seen.append(nf_genid())
run("iptables", "-t", "nat", "-X", "GENID-TEST")
seen.append(nf_genid())
print(json.dumps(seen))
"""


def test_the_generation_moves_with_each_commit_and_not_with_a_read(sandbox: Sandbox) -> None:
    out = sandbox.run([sys.executable, "-c", GENID]).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert all(isinstance(g, int) for g in seen), seen
    first, after_save, after_new, after_delete = seen
    assert after_save == first
    assert after_new == first + 1
    assert after_delete == first + 2


WATCH = r"""
import json, subprocess, sys
import anyio
from netagent.agent import intents as I
from netagent.backends.firewall import FirewallSpec
from netagent.backends.iptables import IptablesBackend

FORWARDS = [I.make_forward(str(20000 + i), f"192.168.15.2:{1 + i}") for i in range(20)]

async def main():
    be = IptablesBackend()
    watcher = be.drift_watcher()
    assert watcher is not None, "not iptables-nft"
    reports = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run, reports.append)

        async def foreign(tag):
            # another process changes one of our chains; wait until it is reported
            proc = subprocess.Popen(["iptables", "-t", "nat", "-A", "NETAGENT-POSTROUTING",
                                     "-m", "comment", "--comment", tag, "-j", "RETURN"])
            proc.wait(30)
            with anyio.fail_after(10):
                while not any(f"pid {proc.pid}" in r for r in reports):
                    await anyio.sleep(0.01)
            return proc.pid

        spec = FirewallSpec()
        await be.apply(be.plan(spec, await be.observe()))
        # until the monitor listens, foreign changes may go unseen: retry the first
        with anyio.fail_after(20):
            while True:
                try:
                    with anyio.fail_after(1):
                        first = await foreign("probe")
                    break
                except TimeoutError:
                    pass
        before = len(reports)
        # our own changes: full plans, updates, and a purge; each its own restores
        await be.apply(be.plan(spec, await be.observe()))
        for fwd in FORWARDS:
            grown = FirewallSpec(forwards=(*spec.forwards, fwd))
            await be.apply(be.plan_update(grown, [fwd], []))
            spec = grown
        for fwd in FORWARDS[:10]:
            smaller = FirewallSpec(forwards=tuple(f for f in spec.forwards if f is not fwd))
            await be.apply(be.plan_update(smaller, [], [fwd]))
            spec = smaller
        await be.purge()
        await be.apply(be.plan(spec, await be.observe()))
        # the monitor reports in commit order: once this is seen, ours have been read
        last = await foreign("barrier")
        tg.cancel_scope.cancel()
    print(json.dumps({"first": first, "last": last, "between": reports[before:]}))

anyio.run(main)
"""


def test_the_watcher_reports_others_and_never_the_backends_own_changes(
    sandbox: Sandbox,
) -> None:
    """iptables-nft: the drift watcher sees someone else's change to our chains (with
    their pid), and none of the ~35 restores the backend itself ran in between."""
    result = sandbox.run([sys.executable, "-c", WATCH], timeout=120)
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    between = answer["between"]
    assert len(between) == 1, between
    assert f"pid {answer['last']}" in between[0]
    assert "iptables" in between[0]
