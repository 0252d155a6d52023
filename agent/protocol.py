"""The socket protocol: versioned JSON, one object per line.

Request:  ``{"v": 1, "id": 7, "op": "fwd.add", "args": {...}}``
Reply:    ``{"v": 1, "id": 7, "ok": true, "result": {...}}``
          ``{"v": 1, "id": 7, "ok": false, "error": {"code": 3004, "name": "port-in-use",
          "message": "..."}}``
``events`` replies once, then streams ``{"v": 1, "event": {...}}`` lines.

Standard library only: the CLI's fast path imports this module.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import BadRequest, NetagentError, UnsupportedVersion

VERSION = 1
MAX_LINE = 1 << 20  # a ctl apply of 10,000 forwards is ~0.8 MB


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, op, args) or a BadRequest/UnsupportedVersion."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request is not valid JSON; send one JSON object per line") from None
    if not isinstance(msg, dict):
        raise BadRequest("request must be a JSON object")
    version = msg.get("v", VERSION)
    if version != VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported; this daemon speaks {VERSION}"
        )
    op = msg.get("op")
    if not isinstance(op, str) or not op:
        raise BadRequest("request has no 'op' string")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise BadRequest("'args' must be a JSON object")
    req_id = msg.get("id")
    if not isinstance(req_id, (int, str, type(None))) or isinstance(req_id, bool):
        req_id = None
    return req_id, op, args


def reply_ok(req_id: Any, result: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": True, "result": result}


def reply_error(req_id: Any, err: NetagentError) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": False, "error": err.to_wire()}
