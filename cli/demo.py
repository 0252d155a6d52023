"""``netagent demo``: the seed's walk, done by the real daemon and the real CLI in a
throwaway sandbox, with every step shown and checked. Nothing is left behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .sandbox import (
    CLIENT_HOST,
    Sandbox,
    SandboxError,
    daemon_argv,
    outside_client_steps,
    wait_ready,
)

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
GREEN = "\033[32m" if sys.stdout.isatty() else ""
RED = "\033[31m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


class DemoFailed(Exception):
    pass


def default_picture() -> Path:
    """Where ``netagent demo`` saves the picture of the seed's topology (it outlives the
    sandbox): PNG when Graphviz is installed, else DOT."""
    suffix = "png" if shutil.which("dot") else "dot"
    return Path(tempfile.gettempdir()) / f"netagent-demo-topology.{suffix}"


class Demo:
    def __init__(self, box: Sandbox, work: Path, picture: Path | None = None) -> None:
        self.picture = picture or default_picture()
        self.box = box
        self.work = work
        self.socket = str(work / "netagent.sock")
        self.state = str(work / "state")
        self.log = work / "daemon.log"
        self.daemon: subprocess.Popen[Any] | None = None
        self.checks = 0
        exe = shutil.which("netagent")
        self.cli = [exe] if exe else [sys.executable, "-m", "netagent"]

    # ---- output -------------------------------------------------------------------
    def section(self, title: str) -> None:
        print(f"\n{BOLD}== {title}{RESET}")

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if not ok:
            print(f"{RED}FAIL{RESET} {what}")
            raise DemoFailed(what)
        print(f"{GREEN}ok{RESET}   {what}")

    # ---- running things -----------------------------------------------------------
    def ctl(self, *args: str, expect: int = 0) -> str:
        print(f"{BOLD}$ netagent ctl {' '.join(args)}{RESET}")
        r = subprocess.run(
            [*self.cli, "ctl", "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = (r.stdout + r.stderr).rstrip()
        if out:
            print("\n".join(f"  {line}" for line in out.splitlines()))
        if r.returncode != expect:
            raise DemoFailed(
                f"`netagent ctl {' '.join(args)}` exited {r.returncode}, expected {expect}"
            )
        return out

    def host(
        self, *argv: str, show: bool = True, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if show:
            print(f"{DIM}# {' '.join(argv)}{RESET}")
        return self.box.run(list(argv), check=check)

    def start_daemon(self) -> None:
        with open(self.log, "a") as log:
            self.daemon = self.box.popen(
                daemon_argv(self.socket, self.state), stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_ready(self.socket, self.daemon)
        except SandboxError as exc:
            raise DemoFailed(f"{exc}:\n{self.log.read_text()[-2000:]}") from None

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            rc = self.box.stop(self.daemon)
            self.daemon = None
            self.check(rc == 0, f"daemon stopped on SIGTERM (exit {rc})")

    def http(self, ns: str | None, url: str) -> str:
        code = (
            "import urllib.request,sys;"
            f"print(urllib.request.urlopen({url!r}, timeout=5).read().decode().strip())"
        )
        argv = [sys.executable, "-c", code]
        if ns:
            argv = ["ip", "netns", "exec", ns, *argv]
        where = f"from {ns}" if ns else "from the host"
        print(f"{DIM}# GET {url} {where}{RESET}")
        r = self.box.run(argv, check=False)
        if r.returncode != 0:
            return (
                f"ERROR: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
            )
        return r.stdout.strip()

    def ping(self, ns: str | None, addr: str) -> bool:
        argv = ["ping", "-c", "1", "-W", "2", addr]
        if ns:
            argv = ["ip", "netns", "exec", ns, *argv]
        return self.box.run(argv, check=False).returncode == 0

    # ---- the walk -----------------------------------------------------------------
    def run(self) -> None:
        self.section("start the daemon in a sandbox (its own network and mount namespace)")
        self.start_daemon()
        self.ctl("status")

        self.section("1. namespaces")
        self.ctl("ns", "add", "red")
        self.ctl("ns", "add", "blue")
        self.ctl("ns", "add", "red")  # again: nothing changes
        self.ctl("ns", "list")

        self.section("2. wire red and blue directly")
        print("the seed gives both ends 192.168.15.1; netagent refuses:")
        self.ctl("wire", "red", "192.168.15.1/24", "blue", "192.168.15.1/24", expect=4)
        print("and an address without a prefix length:")
        self.ctl("wire", "red", "192.168.15.1", "blue", "192.168.15.2", expect=2)
        self.ctl("wire", "red", "192.168.15.1/24", "blue", "192.168.15.2/24")
        self.check(self.ping("red", "192.168.15.2"), "red pings blue (192.168.15.2) over the wire")
        out = self.ctl("neigh", "--ns", "red")
        blue_mac = self.box.run(["ip", "-n", "blue", "-o", "link", "show", "veth-blue"]).stdout
        mac = blue_mac.split("link/ether")[1].split()[0]
        self.check(mac in out, f"red's ARP table holds blue's MAC {mac}")
        self.ctl("unwire", "red", "blue")

        self.section("3. a virtual switch: bridge v-net-0, red and blue plugged in")
        self.ctl("bridge", "add", "v-net-0", "--address", "192.168.15.5/24")
        self.ctl("plug", "red", "v-net-0", "--address", "192.168.15.1/24")
        self.ctl("plug", "blue", "v-net-0", "--address", "192.168.15.2/24")
        print("a third namespace asking for red's address on the same bridge is refused:")
        self.ctl("ns", "add", "green")
        self.ctl("plug", "green", "v-net-0", "--address", "192.168.15.1/24", expect=4)
        self.ctl("ns", "del", "green")
        self.check(self.ping("red", "192.168.15.2"), "red pings blue through the bridge")
        self.check(self.ping("blue", "192.168.15.1"), "blue pings red through the bridge")
        self.check(
            self.ping(None, "192.168.15.2"), "the host pings blue (bridge address as gateway)"
        )
        self.ctl("links", "--ns", "blue")
        self.ctl("routes", "--ns", "blue")

        self.section("4. reach in from outside: forward host port 80 to blue")
        (self.work / "www").mkdir()
        (self.work / "www" / "index.html").write_text("hello from blue\n")
        print(f"{DIM}# ip netns exec blue python -m http.server 80 --bind 192.168.15.2{RESET}")
        server = self.box.popen(
            [
                "ip",
                "netns",
                "exec",
                "blue",
                sys.executable,
                "-m",
                "http.server",
                "80",
                "--bind",
                "192.168.15.2",
                "--directory",
                str(self.work / "www"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ctl("forward", "80", "192.168.15.2:80")
        self.ctl("forward", "80", "192.168.15.3:80", expect=4)
        self.ctl("forward", "0", "192.168.15.2:80", expect=2)
        print("the outside world: a client namespace wired to the host by hand")
        for argv in outside_client_steps():
            self.host(*argv)
        self._wait_http(server)
        host_ip = CLIENT_HOST
        body = self.http("client", f"http://{host_ip}:80/")
        print(f"  {body}")
        self.check(body == "hello from blue", "client -> host:80 reaches blue's web server")
        body = self.http(None, f"http://{host_ip}:80/")
        self.check(body == "hello from blue", "the host itself -> its own address:80 reaches blue")
        body = self.http(None, "http://127.0.0.1:80/")
        self.check(body == "hello from blue", "the host itself -> 127.0.0.1:80 reaches blue")
        self.ctl("forwards")
        self.ctl("show")
        self.ctl("show", "--graph", "--output", str(self.picture))
        self.check(
            self.picture.is_file() and self.picture.stat().st_size > 0,
            f"the picture of the seed's topology is saved: {self.picture}",
        )

        self.section("5. the daemon stops; the data plane keeps working; it comes back")
        self.stop_daemon()
        body = self.http("client", f"http://{host_ip}:80/")
        self.check(body == "hello from blue", "with the daemon down, the forward still works")
        self.start_daemon()
        out = self.ctl("show")
        self.check(
            "!!" not in out and out.count("ok ") == 6,
            "after a restart the same topology is reported, all in place",
        )

        self.section("6. remove everything netagent made")
        self.ctl("purge", "--yes")
        left = [ln.split()[0] for ln in self.box.run(["ip", "netns", "list"]).stdout.splitlines()]
        self.check(left == ["client"], f"only the hand-made client namespace is left ({left})")
        tables = self.box.run(["nft", "list", "tables"]).stdout.strip()
        self.check("netagent" not in tables, "no netagent nft table is left")
        self.stop_daemon()
        self.box.stop(server)

    def _wait_http(self, server: subprocess.Popen[Any]) -> None:
        for _ in range(100):
            if server.poll() is not None:
                raise DemoFailed("the web server in blue exited")
            r = self.box.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    "blue",
                    sys.executable,
                    "-c",
                    "import socket;socket.create_connection(('192.168.15.2',80),1)",
                ],
                check=False,
            )
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise DemoFailed("the web server in blue did not start")


def main(show_log: bool = False, picture: Path | None = None) -> int:
    work = Path(tempfile.mkdtemp(prefix="netagent-demo-"))
    try:
        box = Sandbox()
    except SandboxError as exc:
        print(f"netagent demo: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 2
    demo = Demo(box, work, picture)
    status = 0
    try:
        demo.run()
        print(
            f"\n{GREEN}{BOLD}demo passed: {demo.checks} checks{RESET}; "
            "the sandbox and everything in it are gone"
        )
        print(f"the picture of the seed's topology: {demo.picture}")
    except (DemoFailed, SandboxError, subprocess.TimeoutExpired) as exc:
        print(f"\n{RED}{BOLD}demo failed: {exc}{RESET}", file=sys.stderr)
        print(demo.log.read_text()[-4000:] if demo.log.exists() else "", file=sys.stderr)
        status = 1
    finally:
        if show_log and demo.log.exists():
            print(demo.log.read_text())
        box.close()
        shutil.rmtree(work, ignore_errors=True)
    return status
