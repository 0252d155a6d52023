"""The netfilter netlink family (``NETLINK_NETFILTER``): one way to open its sockets.

Its sockets are kept open by their users (``conntrack.py``, ``nftcount.py``): a socket
opened right after a commit that deleted nf_tables elements waits for the kernel to free
them (~15 ms, ``docs/kernel-facts.md``), and opening one per call costs that each time.
"""

from __future__ import annotations

import socket

NETLINK_NETFILTER = 12


def open_socket(timeout: float) -> socket.socket:
    """A bound netfilter socket whose calls wait at most ``timeout`` seconds."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    sock.settimeout(timeout)
    sock.bind((0, 0))
    return sock
