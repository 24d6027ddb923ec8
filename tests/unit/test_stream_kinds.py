"""Stream kinds: each folds to its own state type and refuses the others' events.

Also the event registry: every registered event type round-trips through its
stored form.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from celery_eventstore import lifecycle as lc
from celery_eventstore.exceptions import CorruptStream, InvalidTransition, UnknownDelivery
from celery_eventstore.lifecycle import (
    ChordState,
    GroupState,
    JobState,
    ResultState,
    StreamKind,
    TaskState,
)

NOW = 1000.0
STREAMS = {StreamKind.TASK: "task-1", StreamKind.GROUP: "group:g1", StreamKind.CHORD: "chord:g1"}

# What each kind holds, stated here so that a change to it is a visible decision.
EVENTS_HELD = {
    StreamKind.TASK: {
        "Published", "Claimed", "LeaseRenewed", "Acked", "Requeued", "LeaseExpired",
        "DeadLettered", "DeadLetterPurged", "Quarantined", "Discarded", "Revoked",
        "StateUpdated", "Started", "RetryScheduled", "Succeeded", "Failed", "ResultFenced",
        "Forgotten", "ResultExpired",
    },
    StreamKind.GROUP: {"GroupSaved", "GroupDeleted", "Forgotten", "ResultExpired"},
    StreamKind.CHORD: {"ChordPartDone", "ChordCompleted"},
}
COMMANDS_ACCEPTED = {
    StreamKind.TASK: {
        "Publish", "Claim", "Renew", "Ack", "Reject", "Restore", "Discard", "PurgeDeadLetter",
        "Revoke", "UpdateState", "Start", "ScheduleRetry", "Succeed", "Fail", "Forget",
        "ExpireResult",
    },
    StreamKind.GROUP: {"SaveGroup", "DeleteGroup", "Forget", "ExpireResult"},
    StreamKind.CHORD: {"CountChordPart"},
}

# A value for each field annotation the events and commands use.
_SAMPLE_VALUES: dict[str, Any] = {
    "str": "x1",
    "int": 3,
    "float": 12.5,
    "bool": True,
    "JSON": {"body": "e30=", "n": [1, 2]},
}


def sample(cls: type) -> Any:
    """An instance of ``cls`` with every field set, optional ones included."""
    values = {}
    for f in dataclasses.fields(cls):
        annotation = str(f.type).removesuffix(" | None")
        values[f.name] = _SAMPLE_VALUES[annotation]
    return cls(**values)


EVENT_SAMPLES = {name: sample(cls) for name, cls in lc.EVENT_TYPES.items()}
COMMAND_TYPES = {cls.__name__: cls for cls in vars(lc).values()
                 if isinstance(cls, type) and issubclass(cls, lc.Command) and cls is not lc.Command}


# -- kinds and their state types ---------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "kind", "state_type"),
    [
        ("task-1", StreamKind.TASK, TaskState),
        ("a0b1c2d3-e4f5", StreamKind.TASK, TaskState),
        ("groupless", StreamKind.TASK, TaskState),
        ("group:g1", StreamKind.GROUP, GroupState),
        ("chord:g1", StreamKind.CHORD, ChordState),
    ],
)
def test_each_kind_folds_to_its_own_state_type(
    stream: str, kind: StreamKind, state_type: type[JobState]
) -> None:
    assert lc.stream_kind(stream) is kind
    assert lc.state_type(stream) is state_type
    state = lc.fold(stream, [])
    assert type(state) is state_type
    assert isinstance(state, JobState)
    assert (state.stream, state.version) == (stream, 0)
    # JobState(stream=...), as the store's rebuild calls it, picks the same type.
    assert JobState(stream=stream) == state
    assert type(JobState(stream=stream)) is state_type


def test_stream_ids_are_made_with_the_prefixes() -> None:
    assert lc.group_stream("g1") == lc.GROUP_PREFIX + "g1" == "group:g1"
    assert lc.chord_stream("g1") == lc.CHORD_PREFIX + "g1" == "chord:g1"
    assert lc.stream_kind(lc.group_stream("g1")) is StreamKind.GROUP
    assert lc.stream_kind(lc.chord_stream("g1")) is StreamKind.CHORD


def test_states_of_different_kinds_are_never_equal() -> None:
    assert lc.fold("group:x", []) != lc.fold("chord:x", [])
    assert TaskState(stream="group:x") != GroupState(stream="group:x")


@pytest.mark.parametrize("kind", [StreamKind.GROUP, StreamKind.CHORD])
def test_a_stream_without_deliveries_answers_as_one(kind: StreamKind) -> None:
    state = lc.fold(STREAMS[kind], [])
    assert state.pending() == []
    with pytest.raises(UnknownDelivery):
        state.delivery("d1")
    assert (state.result_state, state.result, state.custom_state, state.forgotten) == (
        ResultState.PENDING, None, None, False
    )


# -- wrong kinds fail loudly ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(StreamKind))
def test_each_kind_holds_exactly_its_events(kind: StreamKind) -> None:
    held = {t.__name__ for t in lc.STATE_TYPES[kind].rules.evolvers}
    assert held == EVENTS_HELD[kind]
    assert held <= set(lc.EVENT_TYPES)


@pytest.mark.parametrize("kind", list(StreamKind))
def test_each_kind_accepts_exactly_its_commands(kind: StreamKind) -> None:
    accepted = {t.__name__ for t in lc.STATE_TYPES[kind].rules.deciders}
    assert accepted == COMMANDS_ACCEPTED[kind]


def test_every_event_and_command_belongs_to_a_kind() -> None:
    assert set().union(*EVENTS_HELD.values()) == set(lc.EVENT_TYPES)
    assert set().union(*COMMANDS_ACCEPTED.values()) == set(COMMAND_TYPES)


WRONG_EVENTS = [
    pytest.param(kind, name, id=f"{name}-on-{kind.value}")
    for kind in StreamKind
    for name in sorted(set(lc.EVENT_TYPES) - EVENTS_HELD[kind])
]


@pytest.mark.parametrize(("kind", "name"), WRONG_EVENTS)
def test_an_event_of_another_kind_is_a_corrupt_stream(kind: StreamKind, name: str) -> None:
    stream = STREAMS[kind]
    with pytest.raises(CorruptStream) as info:
        lc.evolve(lc.fold(stream, []), EVENT_SAMPLES[name])
    assert name in str(info.value) and stream in str(info.value)
    with pytest.raises(CorruptStream):
        lc.fold(stream, [EVENT_SAMPLES[name]])


WRONG_COMMANDS = [
    pytest.param(kind, name, id=f"{name}-on-{kind.value}")
    for kind in StreamKind
    for name in sorted(set(COMMAND_TYPES) - COMMANDS_ACCEPTED[kind])
]


@pytest.mark.parametrize(("kind", "name"), WRONG_COMMANDS)
def test_a_command_of_another_kind_is_refused(kind: StreamKind, name: str) -> None:
    stream = STREAMS[kind]
    with pytest.raises(InvalidTransition) as info:
        lc.decide(sample(COMMAND_TYPES[name]), lc.fold(stream, []), NOW)
    assert name in str(info.value) and stream in str(info.value)


@pytest.mark.parametrize("kind", list(StreamKind))
def test_not_an_event_nor_a_command_is_refused_on_every_kind(kind: StreamKind) -> None:
    state = lc.fold(STREAMS[kind], [])
    with pytest.raises(CorruptStream, match="not an event"):
        lc.evolve(state, object())  # type: ignore[arg-type]
    with pytest.raises(InvalidTransition, match="not a command"):
        lc.decide(object(), state, NOW)  # type: ignore[arg-type]


# -- group streams -------------------------------------------------------------------


def do(state: JobState, command: Any) -> tuple[JobState, list[lc.Event]]:
    events = lc.decide(command, state, NOW)
    for event in events:
        state = lc.evolve(state, event)
    return state, events


def test_a_group_is_saved_deleted_and_forgotten() -> None:
    state = lc.fold("group:g1", [])
    saved = {"result": [["t1", None]]}
    state, events = do(state, lc.SaveGroup(saved))
    assert events == [lc.GroupSaved(saved)]
    assert isinstance(state, GroupState)
    assert (state.result_state, state.result, state.version) == (ResultState.SUCCESS, saved, 1)
    state, events = do(state, lc.Forget())
    assert events == [lc.Forgotten()] and state.forgotten
    assert do(state, lc.Forget())[1] == []
    state, events = do(state, lc.SaveGroup(saved))
    assert not state.forgotten  # saved again: reported again
    state, events = do(state, lc.DeleteGroup())
    assert events == [lc.GroupDeleted()]
    assert (state.result_state, state.result, state.version) == (ResultState.PENDING, None, 4)
    assert do(state, lc.DeleteGroup())[1] == []  # nothing saved: nothing to delete


def test_a_group_result_expires_once_and_only_when_saved() -> None:
    state = lc.fold("group:g1", [])
    assert do(state, lc.ExpireResult())[1] == []  # nothing saved
    state, _ = do(state, lc.SaveGroup({"result": []}))
    state, events = do(state, lc.ExpireResult())
    assert events == [lc.ResultExpired()] and state.forgotten
    assert do(state, lc.ExpireResult())[1] == []


def test_only_a_final_task_result_expires_and_the_state_stays() -> None:
    state = lc.fold("t1", [])
    state, _ = do(state, lc.Start(worker="w"))
    assert do(state, lc.ExpireResult())[1] == []  # still running: nothing final
    state, _ = do(state, lc.Succeed(result={"body": "1"}))
    state, events = do(state, lc.ExpireResult())
    assert events == [lc.ResultExpired()]
    assert state.forgotten and state.result_state is ResultState.SUCCESS
    assert do(state, lc.ExpireResult())[1] == []


# -- chord streams -------------------------------------------------------------------


def test_a_chord_completes_once_whatever_the_deliveries() -> None:
    state = lc.fold("chord:g1", [])
    state, events = do(state, lc.CountChordPart("t1", "SUCCESS", 2))
    assert events == [lc.ChordPartDone("t1", "SUCCESS")]
    assert do(state, lc.CountChordPart("t1", "SUCCESS", 2))[1] == []  # redelivered part
    state, events = do(state, lc.CountChordPart("t2", "FAILURE", 2))
    assert events == [lc.ChordPartDone("t2", "FAILURE"), lc.ChordCompleted(2)]
    assert isinstance(state, ChordState)
    assert (state.parts, state.completed, state.version) == (frozenset({"t1", "t2"}), True, 3)
    assert do(state, lc.CountChordPart("t3", "SUCCESS", 2))[1] == []


def test_a_chord_snapshot_decides_as_the_whole_stream_does() -> None:
    """The store decides on a state holding the count and only the part asked about."""
    parts = [f"t{i}" for i in range(5)]
    full = lc.fold("chord:g1", [lc.ChordPartDone(p, "SUCCESS") for p in parts])
    assert full.counted == 5
    for asked in ["t2", "t5"]:
        snapshot = ChordState(
            stream="chord:g1", version=full.version, counted=full.counted,
            parts=frozenset({asked}) & full.parts,
        )
        for size in (6, 7):
            command = lc.CountChordPart(asked, "SUCCESS", size)
            assert lc.decide(command, snapshot, 0.0) == lc.decide(command, full, 0.0)


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([lc.ChordPartDone("t1", "SUCCESS")] * 2, id="part-counted-twice"),
        pytest.param([lc.ChordCompleted(1)] * 2, id="completed-twice"),
    ],
)
def test_a_chord_counted_twice_is_a_corrupt_stream(events: list[lc.Event]) -> None:
    with pytest.raises(CorruptStream):
        lc.fold("chord:g1", events)


# -- the event registry ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(lc.EVENT_TYPES))
def test_every_registered_event_type_round_trips(name: str) -> None:
    event = EVENT_SAMPLES[name]
    assert lc.event_type(event) == name
    assert lc.event_from(lc.event_type(event), lc.event_data(event)) == event
    stored = json.loads(json.dumps([lc.event_type(event), lc.event_data(event)]))
    rebuilt = lc.event_from(*stored)
    assert rebuilt == event and type(rebuilt) is type(event)


def test_the_registry_holds_every_event_class_and_nothing_else() -> None:
    classes = {cls for cls in vars(lc).values()
               if isinstance(cls, type) and issubclass(cls, lc.Event) and cls is not lc.Event}
    # Unreadable stands in for a row that cannot be decoded: it is never stored.
    assert set(lc.EVENT_TYPES.values()) == classes - {lc.Unreadable}
    assert all(cls.__name__ == name for name, cls in lc.EVENT_TYPES.items())


@pytest.mark.parametrize(
    "type_name", ["Event", "Command", "TaskState", "GroupState", "Publish", "Unreadable"]
)
def test_only_registered_event_types_are_read(type_name: str) -> None:
    with pytest.raises(CorruptStream):
        lc.event_from(type_name, {})


def test_an_event_type_name_is_registered_once() -> None:
    with pytest.raises(TypeError, match="defined twice"):
        type("Acked", (lc.Event,), {})
    assert lc.EVENT_TYPES["Acked"] is lc.Acked
