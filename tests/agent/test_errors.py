"""The error table is part of the protocol: codes are never renumbered."""

from netagent.agent import errors as E

PINNED = {
    1001: "bad-request",
    1002: "unsupported-version",
    1003: "unknown-op",
    1004: "request-too-large",
    1005: "request-timeout",
    2001: "invalid-argument",
    2002: "invalid-name",
    2003: "invalid-address",
    2004: "invalid-port",
    2005: "invalid-pattern",
    3001: "not-found",
    3002: "conflict",
    3003: "address-in-use",
    3004: "port-in-use",
    3005: "in-use",
    3006: "name-taken",
    4001: "permission-denied",
    4002: "read-only",
    5000: "internal",
    5001: "internal",
    5002: "backend-failed",
    5003: "state-corrupt",
    5004: "backend-unavailable",
    5005: "host-timeout",
    5006: "untrusted-path",
}


def test_codes_are_pinned() -> None:
    table = {code: cls.name for code, cls in E.ERRORS_BY_CODE.items()}
    assert table == PINNED


def test_codes_unique() -> None:
    classes = E._all_error_classes()
    assert len({c.code for c in classes}) == len(classes)


def test_round_trip_keeps_class_and_details() -> None:
    err = E.PortInUse("port 80 taken", conflicts_with="fwd/tcp/80")
    back = E.error_from_wire(err.to_wire())
    assert type(back) is E.PortInUse
    assert back.message == "port 80 taken"
    assert back.details == {"conflicts_with": "fwd/tcp/80"}
    assert back.exit_status == 4


def test_unknown_code_degrades_to_base() -> None:
    back = E.error_from_wire({"code": 9999, "message": "from the future"})
    assert type(back) is E.NetagentError
    assert back.message == "from the future"
