"""Chord streams (``chord:<group id>``) fold to :class:`ChordState`.

The result backend counts each finished header task of a chord here, one writer
per header task, all arbitrated by the stream's version check: the count
reaching the chord's size completes it, and the callback is due exactly once.
A chord stream has no deliveries and no result of its own.

Deciding a count needs only how many parts were counted, whether the chord
completed, and whether *this* part was counted: so the store may hand
:func:`~.streams.decide` a state built from its read model instead of the whole
stream folded (``parts`` then holds just the part asked about, if counted), and a
chord of ten thousand parts costs no more per part than one of three.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..exceptions import CorruptStream
from .commands import CountChordPart
from .events import ChordCompleted, ChordPartDone, Event
from .streams import JobState, Rules, StreamKind, replace

rules = Rules(StreamKind.CHORD)


@dataclass(frozen=True)
class ChordState(JobState, rules=rules):
    """A chord stream folded: how many header tasks were counted, which ones, and
    whether it completed.

    ``parts`` is every counted task when folded from the stream, or only those a
    snapshot was loaded for; ``counted`` is always the full count.
    """

    parts: frozenset[str] = frozenset()
    counted: int = 0
    completed: bool = False


@rules.evolves(ChordPartDone)
def _part_done(state: ChordState, event: ChordPartDone) -> ChordState:
    if event.task_id in state.parts:
        raise CorruptStream(f"chord part {event.task_id!r} counted twice")
    return replace(state, parts=state.parts | {event.task_id}, counted=state.counted + 1)


@rules.evolves(ChordCompleted)
def _completed(state: ChordState, event: ChordCompleted) -> ChordState:
    if state.completed:
        raise CorruptStream(f"chord {state.stream!r} completed twice")
    return replace(state, completed=True)


@rules.decides(CountChordPart)
def _count_part(command: CountChordPart, state: ChordState, now: float) -> list[Event]:
    if command.task_id in state.parts or state.completed:
        return []  # a redelivered header task: counted already
    done: list[Event] = [ChordPartDone(command.task_id, command.state)]
    if state.counted + 1 >= command.size:
        done.append(ChordCompleted(command.size))
    return done
