"""The machinery of requests: typed fields declared once, for the socket and the CLI.

A request class lists its fields as descriptors (:func:`arg`, :func:`opt`, :func:`maybe`,
:func:`flag`). From that one declaration:

* the daemon parses what arrived on the socket into a typed value, once
  (:meth:`Request.parse`), each field through the parser of its :class:`Value` in
  ``agent/values.py``, so one mistake always gets one error code;
* the CLI turns a command line into the request's arguments without loading typer
  (:meth:`Request.from_argv`), and builds the typer command for ``--help``, completion and
  error messages (``cli/app.py``).

Standard library only, and nothing heavy: every ``netagent ctl`` command imports this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar, overload

from .argv import FLAG, MANY, ONE, Shape
from .errors import BadRequest, NetagentError

T = TypeVar("T")
R = TypeVar("R", bound="Request")
#: one field as ``Request.parse`` reads it: name, aliases, parser, label, required,
#: repeatable, default
_Step = tuple[str, tuple[str, ...], Callable[[object, str], Any], str, bool, bool, Any]


class Value(Generic[T]):
    """A kind of argument: the name of its parser in ``agent/values.py`` (which returns
    a ``T``) and how the CLI shows it."""

    __slots__ = ("metavar", "parser")

    def __init__(self, parser: str, metavar: str) -> None:
        self.parser = parser
        self.metavar = metavar


_REQUIRED: Any = object()


class Field(Generic[T]):
    """One argument of a request. Positional on the CLI when ``flag`` is None."""

    __slots__ = (
        "aliases",
        "choices",
        "default",
        "flag",
        "help",
        "instead",
        "label",
        "local",
        "many",
        "metavar",
        "name",
        "value",
    )

    def __init__(
        self,
        value: Value[Any],
        label: str,
        *,
        flag: str | None = None,
        default: Any = _REQUIRED,
        help: str = "",
        many: bool = False,
        aliases: tuple[str, ...] = (),
        metavar: str | None = None,
        choices: tuple[str, ...] | None = None,
        local: bool = False,
    ) -> None:
        self.value = value
        self.label = label
        self.flag = flag
        self.default = default
        self.help = help
        self.many = many
        self.aliases = aliases
        self.metavar = metavar or value.metavar
        #: the only words the CLI takes for it (typer shows and completes them)
        self.choices = choices
        #: the CLI's own (how to show the answer): never sent, never parsed by the daemon
        self.local = local
        self.name = ""
        #: a positional that may be left out: the options that say it instead
        self.instead: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def is_flag(self) -> bool:
        return self.value.parser == "bool"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Field[T]: ...
    @overload
    def __get__(self, obj: Request, owner: type | None = None) -> T: ...
    def __get__(self, obj: Request | None, owner: type | None = None) -> Field[T] | T:
        if obj is None:
            return self
        # a request holds its values as its own attributes (``Request.__init__``), which
        # Python reads before this; here only for one made without this field
        raise AttributeError(f"{type(obj).__name__} has no value for {self.name!r}")


def arg(value: Value[T], label: str, help: str = "", metavar: str | None = None) -> Field[T]:
    """A required positional argument."""
    return Field(value, label, help=help, metavar=metavar)


def maybe_arg(
    value: Value[T],
    label: str,
    instead: tuple[str, ...],
    help: str = "",
    metavar: str | None = None,
) -> Field[T | None]:
    """A positional argument that is left out (None) when one of the options named in
    ``instead`` says the same (``plug NS BRIDGE`` or ``plug --netns PATH BRIDGE``). Such
    arguments come first: a command line with fewer words fills the required ones."""
    f: Field[T | None] = Field(value, label, help=help, metavar=metavar, default=None)
    f.instead = instead
    return f


def opt(
    value: Value[T],
    flag: str,
    label: str,
    default: T,
    help: str = "",
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    local: bool = False,
) -> Field[T]:
    return Field(
        value,
        label,
        flag=flag,
        default=default,
        help=help,
        aliases=aliases,
        choices=choices,
        local=local,
    )


def maybe(
    value: Value[T],
    flag: str,
    label: str,
    help: str = "",
    choices: tuple[str, ...] | None = None,
    local: bool = False,
) -> Field[T | None]:
    """An option that may be left out (None)."""
    return Field(value, label, flag=flag, default=None, help=help, choices=choices, local=local)


def many(
    value: Value[T],
    flag: str,
    label: str,
    help: str = "",
    aliases: tuple[str, ...] = (),
    required: bool = False,
) -> Field[T]:
    """A repeatable option; the field is the parsed whole (e.g. a tuple of addresses)."""
    return Field(
        value,
        label,
        flag=flag,
        default=_REQUIRED if required else None,
        help=help,
        many=True,
        aliases=aliases,
    )


def flag(name: str, label: str, help: str = "", local: bool = False) -> Field[bool]:
    return Field(BOOL, label, flag=name, default=False, help=help, local=local)


BOOL: Value[bool] = Value("bool", "")


class Request:
    """Base of every request. Subclasses set the class attributes and declare fields."""

    op: ClassVar[str]
    #: older op names that still work on the socket
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the ``netagent ctl`` command words
    cli: ClassVar[tuple[str, ...]] = ()
    mutating: ClassVar[bool] = False
    #: the intent kind a request adds, removes or lists (``verb``); ``apply`` documents
    #: name their entries' kind (or one of ``kind_aliases``)
    kind: ClassVar[str | None] = None
    verb: ClassVar[str | None] = None
    kind_aliases: ClassVar[tuple[str, ...]] = ()
    #: the fields, in declaration order (set by ``__init_subclass__``)
    fields: ClassVar[tuple[Field[Any], ...]] = ()
    #: the CLI's own options (``local``): how the CLI shows the answer, never sent
    local_fields: ClassVar[tuple[Field[Any], ...]] = ()
    #: argument name or alias -> its field
    _known: ClassVar[dict[str, Field[Any]]] = {}
    #: how ``parse`` reads the fields (made on first use, per class)
    _plan: ClassVar[tuple[_Step, ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        found: dict[str, Field[Any]] = {f.name: f for f in (*cls.fields, *cls.local_fields)}
        for name, value in vars(cls).items():
            if isinstance(value, Field):
                found[name] = value
        cls.fields = tuple(f for f in found.values() if not f.local)
        cls.local_fields = tuple(f for f in found.values() if f.local)
        cls._known = {n: f for f in cls.fields for n in (f.name, *f.aliases)}

    def __init__(self, **values: Any) -> None:
        # each field's value as the instance's own attribute: read without the field's
        # ``__get__`` (a 10,000-forward apply reads 40,000 of them)
        self.__dict__.update(values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Request) and type(other) is type(self) and vars(other) == vars(self)
        )

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items(), key=str))))

    # ---- the daemon's side: what arrived -> typed values ------------------------------
    @classmethod
    def parse(cls: type[R], args: Mapping[str, object], ignore: str | None = None) -> R:
        """Parse the arguments of this op, once. Unknown arguments are refused (a typo
        would otherwise be silently ignored); ``ignore`` names a key of ``args`` that is
        not an argument (an ``apply`` entry's ``kind``)."""
        known = cls._known
        for k in args:
            if k not in known and k != ignore:
                raise BadRequest(
                    f"{cls.op}: unknown argument {k!r}; "
                    f"known: {', '.join(f.name for f in cls.fields) or 'none'}"
                )
        plan = cls.__dict__["_plan"] if "_plan" in cls.__dict__ else cls._make_plan()
        values: dict[str, Any] = {}
        for name, aliases, parse, label, required, many, default in plan:
            raw = args.get(name)
            for alias in aliases:
                if raw is None:
                    raw = args.get(alias)
            if raw is None or (many and raw == []):
                if required:
                    raise BadRequest(f"{cls.op}: missing argument {name!r} ({label})")
                # a repeatable option left out is its parser's empty value; any other
                # default is already a typed value
                values[name] = parse(None, label) if many else default
                continue
            values[name] = parse(raw, label)
        return cls(**values)

    @classmethod
    def _make_plan(cls) -> tuple[_Step, ...]:
        """Each field's parser looked up once per class (``apply`` parses 10,000 requests
        in one go: the lookups were a tenth of its time)."""
        from .values import PARSERS

        plan = tuple(
            (f.name, f.aliases, PARSERS[f.value.parser], f.label, f.required, f.many, f.default)
            for f in cls.fields
        )
        cls._plan = plan
        return plan

    # ---- the CLI's side: a command line -> the arguments to send ----------------------
    @classmethod
    def from_argv(cls, argv: list[str]) -> dict[str, Any] | None:
        """The arguments for this op from the words after the command (the CLI's own
        options among them), or None when the line is not plainly valid (then typer
        parses it and says what is wrong). One parser for this and the fast path:
        :func:`netagent.agent.argv.parse`."""
        from .argv import parse

        return parse(cls.shape(), argv)

    @classmethod
    def shape(cls) -> Shape:
        """What the command line of this op looks like, as plain data (the fast path's
        table, ``cli/words.py``, holds these)."""
        every = (*cls.fields, *cls.local_fields)
        flags: dict[str, tuple[str, int, tuple[str, ...] | None]] = {}
        for f in every:
            if f.flag is not None:
                arity = FLAG if f.is_flag else MANY if f.many else ONE
                flags[f.flag] = (f.name, arity, f.choices)
        return (
            tuple(f.name for f in every if f.flag is None),
            flags,
            tuple(f.name for f in every if f.required),
            tuple(f.name for f in cls.local_fields),
            tuple((f.name, f.instead) for f in every if f.flag is None and f.instead),
        )


def prefix_error(exc: NetagentError, prefix: str) -> NetagentError:
    """The same error, its message prefixed (``intent #3 (plug): ...``)."""
    exc.message = f"{prefix}: {exc.message}"
    exc.args = (exc.message,)
    return exc
