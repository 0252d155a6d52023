"""Command-line words -> a request's arguments: the one parser of ``netagent ctl`` lines.

:meth:`Request.from_argv <netagent.agent.schema.Request.from_argv>` and the CLI's fast
path (``cli/entry.py``) both call :func:`parse`, with a request's :meth:`shape
<netagent.agent.schema.Request.shape>`: plain data (names, flags, arities), which the fast
path reads from a literal table (``cli/words.py``) instead of building the request
classes. This module imports nothing, not even ``typing``: every ``ctl`` command loads it.

It never checks values (the daemon parses them, once, into one error code per mistake)
and never explains: a line it cannot take plainly returns None, and typer then parses it
and says what is wrong in its own words.
"""

from __future__ import annotations

#: how many values an option takes: none (a flag), one, or one per repetition
FLAG, ONE, MANY = 0, 1, 2

#: (positional names, {flag: (name, arity, choices or None)}, required names, the CLI's
#: own names, (positional that may be left out, the options that say it instead)): what
#: :meth:`Request.shape` gives
Shape = tuple[
    tuple[str, ...],
    dict[str, tuple[str, int, "tuple[str, ...] | None"]],
    tuple[str, ...],
    tuple[str, ...],
    "tuple[tuple[str, tuple[str, ...]], ...]",
]


def parse(shape: Shape, argv: list[str]) -> dict[str, object] | None:
    """The arguments that ``argv`` (the words after the command) gives, by field name;
    None when the line is not plainly valid: an unknown or short option, a flag with a
    value, an option without its value, a single-valued option twice, a value outside
    its choices, too many or too few words, a required argument left out (a positional
    that may be left out only when an option says it instead: ``plug --netns PATH
    BRIDGE``)."""
    positional, flags, required, _local, instead = shape
    out: dict[str, object] = {}
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            words.extend(argv[i + 1 :])
            break
        if word.startswith("--"):
            name, eq, inline = word.partition("=")
            spec = flags.get(name)
            if spec is None:
                return None
            field, arity, choices = spec
            if arity == FLAG:
                if eq:
                    return None
                out[field] = True
            else:
                if eq:
                    value = inline
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    return None
                if choices is not None and value not in choices:
                    return None
                if arity == MANY:
                    seen = out.setdefault(field, [])
                    assert isinstance(seen, list)
                    seen.append(value)
                elif field in out:
                    return None
                else:
                    out[field] = value
        elif word.startswith("-") and word != "-":
            return None
        else:
            words.append(word)
        i += 1
    if len(words) != len(positional):
        # the positionals that may be left out are, when an option says them instead
        if len(words) != len(positional) - len(instead) or not all(
            any(name in out for name in names) for _field, names in instead
        ):
            return None
        left_out = {field for field, _names in instead}
        positional = tuple(f for f in positional if f not in left_out)
    for field, word in zip(positional, words, strict=True):
        out[field] = word
    for field in required:
        if field not in out:
            return None
    return out


def split_local(
    shape: Shape, args: dict[str, object]
) -> tuple[dict[str, object], dict[str, object]]:
    """(what is sent to the daemon, the CLI's own options)."""
    local = shape[3]
    if not local:
        return args, {}
    return (
        {k: v for k, v in args.items() if k not in local},
        {k: v for k, v in args.items() if k in local},
    )
