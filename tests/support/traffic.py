"""Traffic inside a sandbox: the outside client namespace and HTTP GETs with a deadline."""

from __future__ import annotations

import subprocess
import time

from netagent.cli.sandbox import CLIENT_HOST, Sandbox, SandboxError, outside_client_steps


def outside_client(box: Sandbox) -> str:
    """The ``client`` namespace standing in for the outside world (made once per
    sandbox); returns the host address it reaches published ports on."""
    if "client" not in box.run(["ip", "netns", "list"], timeout=10).stdout.split():
        for argv in outside_client_steps():
            box.run(argv, timeout=10)
    return CLIENT_HOST


def http_get(box: Sandbox, url: str, ns: str | None = None, timeout: float = 3) -> str:
    """One GET with busybox wget (static, on the host), from namespace ``ns`` or the
    sandbox's host; raises SandboxError when it fails. The time limit is ``timeout(1)``:
    Debian 12's busybox-static 1.35 wget crashes (SIGSEGV) when given ``-T``."""
    argv = ["timeout", f"{timeout:g}", "busybox", "wget", "-q", "-O", "-", url]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return box.run(argv, timeout=timeout + 5).stdout


def wait_http(
    box: Sandbox, url: str, ns: str | None = None, expect: str = "", timeout: float = 20
) -> str:
    """GET ``url`` until the body contains ``expect`` (a container's server starts a
    moment after ``run -d`` returns); SandboxError with the last failure after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            body = http_get(box, url, ns, timeout=min(3, timeout))
            if expect in body:
                return body
            last = f"unexpected body {body[:200]!r}"
        except (SandboxError, subprocess.TimeoutExpired) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            where = ns or "the host"
            raise SandboxError(f"GET {url} from {where} failed for {timeout:g} s: {last}")
        time.sleep(0.05)
