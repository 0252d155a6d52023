"""JSON for the plugin through CPython's ``_json`` accelerator alone.

``import json`` costs ~6 ms here, most of it ``re`` and ``enum`` (``json.decoder``
compiles its patterns at import), more than the rest of the plugin; the scanner and the
encoder that ``json`` uses are in ``_json`` and need neither. Objects in, objects out,
as ``json.loads``/``json.dumps`` (compact separators, ASCII). Where ``_json`` is missing
(another Python), ``json`` itself is used.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]

_WHITESPACE = " \t\n\r"


class _Context:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}  # noqa: RUF012 - the scanner's own cache of keys

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


def _unserializable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


if _json is not None:
    _scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed, as json's
    _encode = _json.make_encoder(
        {}, _unserializable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )


def loads(data: bytes | str) -> Any:
    """A JSON document; ValueError when it is not one (as ``json.loads``)."""
    if _json is None:
        import json

        return json.loads(data)
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        obj, end = _scan(text, start)
    except StopIteration:
        raise ValueError("Expecting value") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError("Extra data")
    return obj


def dumps(obj: Any) -> str:
    if _json is None:
        import json

        return json.dumps(obj, separators=(",", ":"))
    return "".join(_encode(obj, 0))
