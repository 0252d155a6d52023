"""The unit files in ``systemd/`` read statically: what they set, and what ``systemd-analyze
security`` finds open (no root; the service tests check the units against the running
daemon)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.support.units import SERVICE, SOCKET, unit_settings


def test_units_say_what_the_issue_asks() -> None:
    s = dict(unit_settings(SERVICE))
    assert s["Type"] == "notify"
    assert s["Restart"] == "on-failure"
    assert s["StateDirectory"] == "netagent"
    assert s["RuntimeDirectory"] == "netagent"
    assert s["WatchdogSec"]
    assert s["NotifyAccess"] == "main"
    assert set(s["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    sock = dict(unit_settings(SOCKET))
    assert sock["ListenStream"] == "/run/netagent/netagent.sock"
    assert (sock["SocketMode"], sock["SocketUser"], sock["SocketGroup"]) == (
        "0660",
        "root",
        "netagent",
    )
    assert s["Group"] == sock["SocketGroup"]


# What ``systemd-analyze security`` leaves open, and why. A setting that opens up, or one
# that is closed, fails the test so this table (and the report) stays true.
OPEN_SETTINGS = {
    "User=/DynamicUser=": "root is needed: setns/unshare and bind mounts under /run/netns; "
    "the bounding set keeps only CAP_NET_ADMIN and CAP_SYS_ADMIN",
    "PrivateNetwork=": "its job is the host's network",
    "CapabilityBoundingSet=~CAP_SYS_ADMIN": "ip netns add / setns need it",
    "CapabilityBoundingSet=~CAP_NET_ADMIN": "links, routes, nftables, conntrack need it",
    "SystemCallFilter=~@mount": "ip netns add bind-mounts the namespace under /run/netns",
    "RestrictNamespaces=~net": "it creates network namespaces",
    "RestrictAddressFamilies=~AF_NETLINK": "netlink is how it talks to the kernel",
    "RestrictAddressFamilies=~AF_UNIX": "its own socket, sd_notify",
    "PrivateMounts=": "mount namespace: the /run/netns bind mounts would not reach the host",
    "ProtectSystem=": "mount namespace (as above)",
    "ProtectHome=": "mount namespace (as above)",
    "PrivateTmp=": "mount namespace (as above)",
    "PrivateDevices=": "mount namespace (as above); DevicePolicy=closed limits devices",
    "ProtectKernelTunables=": "mount namespace, and it must write net.ipv4.ip_forward",
    "ProtectKernelModules=": "mount namespace (CAP_SYS_MODULE is dropped anyway)",
    "ProtectKernelLogs=": "mount namespace (CAP_SYSLOG is dropped anyway)",
    "ProtectControlGroups=": "mount namespace",
    "ProtectProc=": "mount namespace; it reads /proc/self/ns and /proc/sys/net",
    "ProcSubset=": "mount namespace (as above)",
    "PrivateUsers=": "capabilities in a user namespace do not reach the host's network",
    "RootDirectory=/RootImage=": "runs ip, nft, iptables, conntrack from the host",
    "DeviceAllow=": "ProtectClock= adds char-rtc read access",
}


def test_systemd_analyze_security_exposure() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout
    score = re.search(r"Overall exposure level for netagent\.service: ([0-9.]+)", out)
    assert score is not None, out + result.stderr
    open_now = {m.group(1) for m in re.finditer(r"^✗ (\S+)", out, re.M)}
    print(f"systemd-analyze security: exposure {score.group(1)}; open: {sorted(open_now)}")
    assert float(score.group(1)) <= 4.0
    assert open_now == set(OPEN_SETTINGS), open_now ^ set(OPEN_SETTINGS)
