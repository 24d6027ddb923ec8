"""Group streams (``group:<group id>``) fold to :class:`GroupState`.

The result backend saves a group's member results here (``GroupResult.save()``)
and deletes them (``GroupResult.delete()``); the results of the member tasks
themselves live in their own task streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from .commands import DeleteGroup, ExpireResult, Forget, SaveGroup
from .events import JSON, Event, Forgotten, GroupDeleted, GroupSaved, ResultExpired
from .streams import JobState, ResultState, Rules, StreamKind, replace

rules = Rules(StreamKind.GROUP)


@dataclass(frozen=True)
class GroupState(JobState, rules=rules):
    """A group stream folded: its saved result (``SUCCESS``) or none (``PENDING``)."""

    result_state: ResultState = ResultState.PENDING
    result: JSON | None = None
    forgotten: bool = False


@rules.evolves(GroupSaved)
def _group_saved(state: GroupState, event: GroupSaved) -> GroupState:
    return replace(state, result_state=ResultState.SUCCESS, result=event.result, forgotten=False)


@rules.evolves(GroupDeleted)
def _group_deleted(state: GroupState, event: GroupDeleted) -> GroupState:
    return replace(state, result_state=ResultState.PENDING, result=None)


@rules.evolves(Forgotten, ResultExpired)
def _forgotten(state: GroupState, event: Forgotten | ResultExpired) -> GroupState:
    return replace(state, forgotten=True)


@rules.decides(SaveGroup)
def _save_group(command: SaveGroup, state: GroupState, now: float) -> list[Event]:
    return [GroupSaved(command.result)]


@rules.decides(DeleteGroup)
def _delete_group(command: DeleteGroup, state: GroupState, now: float) -> list[Event]:
    return [GroupDeleted()] if state.result is not None else []


@rules.decides(Forget)
def _forget(command: Forget, state: GroupState, now: float) -> list[Event]:
    return [] if state.forgotten else [Forgotten()]


@rules.decides(ExpireResult)
def _expire_result(command: ExpireResult, state: GroupState, now: float) -> list[Event]:
    return [] if state.forgotten or state.result is None else [ResultExpired()]
