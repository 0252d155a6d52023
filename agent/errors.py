"""One error hierarchy with stable numeric codes.

Codes travel on the wire as a field (never parsed out of a message) and are pinned by a
test so they are never renumbered. Ranges:

* 1xxx: the request itself (framing, version, op, argument types)
* 2xxx: a value that is not valid (name, address, port)
* 3xxx: a valid value that conflicts with the desired state
* 4xxx: who is asking
* 5xxx: the host refused or failed (kernel, nft, iptables, storage)

This module is imported by the CLI's fast path: standard library only.
"""

from __future__ import annotations

from typing import Any, ClassVar


class NetagentError(Exception):
    """Base class: every error netagent reports carries a code, a name and a message."""

    code: ClassVar[int] = 5000
    name: ClassVar[str] = "internal"
    #: exit status of the CLI when the daemon answers with this error
    exit_status: ClassVar[int] = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code, "name": self.name, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire


# 1xxx: the request
class BadRequest(NetagentError):
    code = 1001
    name = "bad-request"
    exit_status = 2


class UnsupportedVersion(NetagentError):
    code = 1002
    name = "unsupported-version"
    exit_status = 2


class UnknownOp(NetagentError):
    code = 1003
    name = "unknown-op"
    exit_status = 2


class RequestTooLarge(NetagentError):
    code = 1004
    name = "request-too-large"
    exit_status = 2


class RequestTimeout(NetagentError):
    code = 1005
    name = "request-timeout"
    exit_status = 2


# 2xxx: invalid values
class InvalidArgument(NetagentError):
    code = 2001
    name = "invalid-argument"
    exit_status = 2


class InvalidName(InvalidArgument):
    code = 2002
    name = "invalid-name"


class InvalidAddress(InvalidArgument):
    code = 2003
    name = "invalid-address"


class InvalidPort(InvalidArgument):
    code = 2004
    name = "invalid-port"


class InvalidPattern(InvalidArgument):
    code = 2005
    name = "invalid-pattern"


# 3xxx: conflicts with the desired state
class NotFound(NetagentError):
    code = 3001
    name = "not-found"
    exit_status = 3


class Conflict(NetagentError):
    code = 3002
    name = "conflict"
    exit_status = 4


class AddressInUse(Conflict):
    code = 3003
    name = "address-in-use"


class PortInUse(Conflict):
    code = 3004
    name = "port-in-use"


class InUse(Conflict):
    code = 3005
    name = "in-use"


class NameTaken(Conflict):
    code = 3006
    name = "name-taken"


# 4xxx: who is asking
class PermissionDenied(NetagentError):
    code = 4001
    name = "permission-denied"
    exit_status = 5


class ReadOnly(PermissionDenied):
    code = 4002
    name = "read-only"


# 5xxx: the host
class Internal(NetagentError):
    code = 5001
    name = "internal"


class BackendFailed(NetagentError):
    code = 5002
    name = "backend-failed"
    exit_status = 6


class StateCorrupt(NetagentError):
    code = 5003
    name = "state-corrupt"
    exit_status = 6


class BackendUnavailable(NetagentError):
    code = 5004
    name = "backend-unavailable"
    exit_status = 6


class HostTimeout(BackendFailed):
    """The kernel or a tool did not answer in time: the request fails, the daemon not."""

    code = 5005
    name = "host-timeout"


class UntrustedPath(NetagentError):
    """A directory or file the daemon acts on as root is writable by someone else, or is
    a link: starting would let them steer root (``agent/paths.py``)."""

    code = 5006
    name = "untrusted-path"
    exit_status = 6


def _all_error_classes() -> list[type[NetagentError]]:
    seen: list[type[NetagentError]] = []
    stack: list[type[NetagentError]] = [NetagentError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


ERRORS_BY_CODE: dict[int, type[NetagentError]] = {c.code: c for c in _all_error_classes()}


def error_from_wire(wire: dict[str, Any]) -> NetagentError:
    """Rebuild the error a reply carries (the CLI maps it to an exit status)."""
    code = wire.get("code")
    cls = ERRORS_BY_CODE.get(code, NetagentError) if isinstance(code, int) else NetagentError
    details = wire.get("details")
    err = cls(
        str(wire.get("message", "unknown error")), **(details if isinstance(details, dict) else {})
    )
    return err
