"""Stream kinds, the state every stream folds to, and each kind's rules.

A stream's id says its kind: ``group:<id>`` holds a group's saved result,
``chord:<id>`` a chord's counter of finished header tasks, and any other id is
one task.  Each kind folds to a state type of its own (a subclass of
:class:`JobState`) and has its own :class:`Rules`: one small function per event
it folds and per command it decides.  An event or command of another kind's is
refused loudly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar

from ..exceptions import CorruptStream, InvalidTransition, UnknownDelivery
from .commands import Command
from .delivery import Delivery
from .events import JSON, Event

GROUP_PREFIX = "group:"
CHORD_PREFIX = "chord:"


class StreamKind(str, Enum):
    TASK = "task"
    GROUP = "group"
    CHORD = "chord"


def group_stream(group_id: str) -> str:
    """The stream of a group's saved result."""
    return GROUP_PREFIX + group_id


def chord_stream(group_id: str) -> str:
    """The stream counting the header tasks of the chord over group ``group_id``."""
    return CHORD_PREFIX + group_id


def group_of(stream: str) -> str | None:
    """The group id a group or chord stream belongs to; None for a task stream."""
    for prefix in (GROUP_PREFIX, CHORD_PREFIX):
        if stream.startswith(prefix):
            return stream[len(prefix):]
    return None


def stream_kind(stream: str) -> StreamKind:
    if stream.startswith(GROUP_PREFIX):
        return StreamKind.GROUP
    if stream.startswith(CHORD_PREFIX):
        return StreamKind.CHORD
    return StreamKind.TASK


class ResultState(str, Enum):
    """Celery's state names, so the backend can hand them over unchanged."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"


Evolver = Callable[[Any, Any], Any]  # (state, event) -> state of the same kind
Decider = Callable[[Any, Any, float], list[Any]]  # (command, state, now) -> events
F = TypeVar("F", bound=Evolver)
D = TypeVar("D", bound=Decider)


class Rules:
    """One stream kind's rules, filled by decorating one function per type.

    Looked up by the exact type (events and commands are never subclassed): one
    dict lookup per event, cheaper than an ``isinstance`` ladder or singledispatch.
    """

    def __init__(self, kind: StreamKind) -> None:
        self.kind = kind
        #: The function that folds each event type this kind may hold.
        self.evolvers: dict[type, Evolver] = {}
        #: The function that decides each command type this kind accepts.
        self.deciders: dict[type, Decider] = {}

    def evolves(self, *event_types: type) -> Callable[[F], F]:
        def register(function: F) -> F:
            self.evolvers.update(dict.fromkeys(event_types, function))
            return function

        return register

    def decides(self, *command_types: type) -> Callable[[D], D]:
        def register(function: D) -> D:
            self.deciders.update(dict.fromkeys(command_types, function))
            return function

        return register


#: The state type each kind folds to; filled by :class:`JobState` subclasses.
STATE_TYPES: dict[StreamKind, type[JobState]] = {}


def state_type(stream: str) -> type[JobState]:
    """The state type ``stream``'s kind folds to."""
    return STATE_TYPES[stream_kind(stream)]


@dataclass(frozen=True)
class JobState:
    """A stream folded; the base of each kind's state type.

    ``JobState(stream=...)`` makes the empty state of the type that stream's
    kind folds to.  The properties below are what the store and the result
    backend read on any stream: a kind that has no deliveries or no result of
    its own answers as a stream with none (task and group states override them).
    """

    stream: str
    version: int = 0
    #: The recorded time of the stream's last event, as the store read it (0 for a
    #: state folded from bare events).  Not part of the model -- events carry no
    #: time -- it lets the store record a stream's times without running backwards.
    recorded_until: float = field(default=0.0, compare=False)
    #: The stream's birth day as the store read it (None for a new stream, or one
    #: older than the day was recorded).  Not part of the model either: the store
    #: appends every event of a stream with its first event's, so the stream stays
    #: in one partition of a partitioned log.
    born: int | None = field(default=None, compare=False)

    rules: ClassVar[Rules]

    def __init_subclass__(cls, rules: Rules | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if rules is not None:
            cls.rules = rules
            STATE_TYPES[rules.kind] = cls

    def __new__(cls, *args: Any, **fields: Any) -> JobState:
        if cls is JobState:  # the kind's own type, picked by the stream id
            cls = state_type(fields["stream"] if "stream" in fields else args[0])
        return object.__new__(cls)

    @property
    def result_state(self) -> ResultState:
        return ResultState.PENDING

    @property
    def result(self) -> JSON | None:
        return None

    @property
    def custom_state(self) -> str | None:
        return None

    @property
    def forgotten(self) -> bool:
        return False

    def delivery(self, delivery_id: str) -> Delivery:
        raise UnknownDelivery(f"stream {self.stream!r} has no delivery {delivery_id!r}")

    def pending(self) -> list[Delivery]:
        """Deliveries that are not settled yet: none on a stream without deliveries."""
        return []


_T = TypeVar("_T")


def replace(obj: _T, **changes: Any) -> _T:
    """:func:`dataclasses.replace` without re-running ``__init__`` (the states have
    no ``__post_init__``): folding streams is the hot path of every claim."""
    fields = obj.__dataclass_fields__  # type: ignore[attr-defined]
    if not changes.keys() <= fields.keys():
        unknown = sorted(changes.keys() - fields.keys())
        raise TypeError(f"{type(obj).__name__} has no field(s) {unknown}")
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new


def evolve(state: JobState, event: Event) -> JobState:
    """Apply one event.  Raises :class:`CorruptStream` for an event the stream's
    kind cannot hold or an impossible sequence."""
    try:
        apply = state.rules.evolvers[type(event)]
    except KeyError:
        raise CorruptStream(_misplaced(event, state, "an event", Event)) from None
    new: JobState = apply(state, event)
    if new is state:
        return replace(new, version=state.version + 1)
    # A state the evolver has just made (with replace) is nobody else's yet:
    # numbering it in place saves a third copy per event on every fold.
    new.__dict__["version"] = state.version + 1
    return new


def decide(command: Command, state: JobState, now: float) -> list[Event]:
    """The events ``command`` produces in ``state`` at time ``now``.

    Raises :class:`InvalidTransition` (or a subclass) when the command is not
    allowed; the state is never partially changed because nothing is written.
    An empty list means the command is satisfied already (idempotent no-op).
    """
    try:
        rule = state.rules.deciders[type(command)]
    except KeyError:
        raise InvalidTransition(_misplaced(command, state, "a command", Command)) from None
    events: list[Event] = rule(command, state, now)
    return events


def fold(stream: str, events: Iterable[Event]) -> JobState:
    """The state a stream's events add up to, of the type its kind folds to."""
    state = state_type(stream)(stream=stream)
    for event in events:
        state = evolve(state, event)
    return state


def _misplaced(item: object, state: JobState, what: str, base: type) -> str:
    if not isinstance(item, base):
        return f"not {what}: {item!r}"
    kind = state.rules.kind.value
    return f"{type(item).__name__} does not apply to {kind} stream {state.stream!r}"
