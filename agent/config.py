"""Daemon settings: defaults, then the config file (TOML), then command-line options."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

DEFAULT_SOCKET = "/run/netagent/netagent.sock"
DEFAULT_STATE_DIR = "/var/lib/netagent"


@dataclass
class Config:
    socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    firewall: str = "nftables"
    #: members may change things through the socket (root always may)
    socket_group: str | None = "netagent"
    #: members may only look
    readonly_group: str | None = None
    #: seconds between full reconcile passes (the safety net under events)
    resync_interval: float = 30.0
    #: seconds a client may take to send a request or read a reply
    client_timeout: float = 10.0
    #: "auto" (console on a terminal, JSON otherwise), "console" or "json"
    log_format: str = "auto"

    @classmethod
    def load(cls, path: str | None, overrides: dict[str, Any]) -> Config:
        values: dict[str, Any] = {}
        if path is not None:
            try:
                doc = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise InvalidArgument(f"config file {path} does not exist") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None
            section = doc.get("netagent", doc)
            known = {f.name for f in fields(cls)}
            unknown = set(section) - known
            if unknown:
                raise InvalidArgument(
                    f"config file {path}: unknown settings {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(sorted(known))}"
                )
            values.update(section)
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if (
            self.firewall not in ("nftables", "iptables", "auto")
            and not self.firewall.isidentifier()
        ):
            raise InvalidArgument(f"firewall {self.firewall!r}: use nftables, iptables or auto")
        if self.resync_interval <= 0 or self.client_timeout <= 0:
            raise InvalidArgument("resync_interval and client_timeout must be positive")
        if self.log_format not in ("auto", "console", "json"):
            raise InvalidArgument("log_format must be auto, console or json")
