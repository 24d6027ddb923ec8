"""The job lifecycle: events, commands, the state of each kind of stream, and the
rules between them.

Pure: no I/O, no clock of its own.  Time comes in as ``now`` (seconds since the
epoch, float), so every rule is testable without a database and without
sleeping, and every storage dialect shares it.

A stream's id says its kind, and each kind folds to a state type of its own:

==================  ===============  ================================================
stream id           folds to         holds
==================  ===============  ================================================
``<task id>``       ``TaskState``    every delivery of one task, and its result state
``group:<id>``      ``GroupState``   a group's saved member results
``chord:<id>``      ``ChordState``   the count of a chord's finished header tasks
==================  ===============  ================================================

:func:`decide` turns a command into events (or raises
:class:`~celery_eventstore.exceptions.InvalidTransition`), :func:`evolve` folds
one event into a state (or raises :class:`~celery_eventstore.exceptions.CorruptStream`),
:func:`fold` folds a whole stream, starting from ``JobState(stream=...)``, the
empty state of the stream's kind.  Each kind's module has one small function per
event it folds and per command it decides; an event or command of another kind's
is refused.  Who moves a delivery between its states is told in :mod:`.delivery`.

Modules: :mod:`.events` (the event types, registered once, and their stored
form), :mod:`.commands`, :mod:`.streams` (stream kinds, the base state, and
``evolve``/``decide``/``fold``), :mod:`.delivery`, :mod:`.task`, :mod:`.group`,
:mod:`.chord`.
"""

from .chord import ChordState
from .commands import (
    Ack,
    Claim,
    Command,
    CountChordPart,
    DeleteGroup,
    Discard,
    ExpireResult,
    Fail,
    Forget,
    Publish,
    PurgeDeadLetter,
    Reject,
    Renew,
    Restore,
    Revoke,
    SaveGroup,
    ScheduleRetry,
    Start,
    Succeed,
    UpdateState,
)
from .delivery import Delivery, DeliveryStatus
from .events import (
    EVENT_TYPES,
    JSON,
    Acked,
    ChordCompleted,
    ChordPartDone,
    Claimed,
    DeadLettered,
    DeadLetterPurged,
    Discarded,
    Event,
    Failed,
    Forgotten,
    GroupDeleted,
    GroupSaved,
    LeaseExpired,
    LeaseRenewed,
    Published,
    Quarantined,
    Requeued,
    ResultExpired,
    ResultFenced,
    RetryScheduled,
    Revoked,
    Started,
    StateUpdated,
    Succeeded,
    Unreadable,
    event_data,
    event_from,
    event_type,
)
from .group import GroupState
from .streams import (
    CHORD_PREFIX,
    GROUP_PREFIX,
    STATE_TYPES,
    JobState,
    ResultState,
    StreamKind,
    chord_stream,
    decide,
    evolve,
    fold,
    group_of,
    group_stream,
    replace,
    state_type,
    stream_kind,
)
from .task import CLOCKLESS_RESULT_WRITES, RESULT_NEUTRAL_EVENTS, TaskState

__all__ = [
    "CHORD_PREFIX",
    "CLOCKLESS_RESULT_WRITES",
    "RESULT_NEUTRAL_EVENTS",
    "GROUP_PREFIX",
    "STATE_TYPES",
    "ChordState",
    "GroupState",
    "StreamKind",
    "group_of",
    "TaskState",
    "chord_stream",
    "group_stream",
    "state_type",
    "stream_kind",
    "EVENT_TYPES",
    "JSON",
    "Ack",
    "Acked",
    "ChordCompleted",
    "ChordPartDone",
    "Claim",
    "Claimed",
    "Command",
    "CountChordPart",
    "DeadLetterPurged",
    "DeadLettered",
    "DeleteGroup",
    "Delivery",
    "DeliveryStatus",
    "Discard",
    "Discarded",
    "Event",
    "Fail",
    "Failed",
    "ExpireResult",
    "Forget",
    "Forgotten",
    "ResultExpired",
    "GroupDeleted",
    "GroupSaved",
    "JobState",
    "LeaseExpired",
    "LeaseRenewed",
    "Publish",
    "Published",
    "Quarantined",
    "PurgeDeadLetter",
    "Reject",
    "Renew",
    "Requeued",
    "Restore",
    "ResultFenced",
    "ResultState",
    "RetryScheduled",
    "Revoke",
    "Revoked",
    "SaveGroup",
    "ScheduleRetry",
    "Start",
    "Started",
    "StateUpdated",
    "Succeed",
    "Succeeded",
    "Unreadable",
    "UpdateState",
    "decide",
    "event_data",
    "event_from",
    "event_type",
    "evolve",
    "fold",
    "replace",
]
