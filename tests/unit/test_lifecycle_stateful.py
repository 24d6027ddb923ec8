"""Property-based tests of the job lifecycle: a state machine over one stream.

Every rule turns a random command into ``decide(command, state, now)``.  A refused
command (an :class:`InvalidTransition`) changes nothing; otherwise its events are
folded into the state with ``evolve`` and recorded, as a store would append them.
The invariants then check the state against the recorded log after every step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from celery_eventstore.exceptions import InvalidTransition, NotClaimable, StaleClaim
from celery_eventstore.lifecycle import (
    CLOCKLESS_RESULT_WRITES,
    RESULT_NEUTRAL_EVENTS,
    Ack,
    Acked,
    Claim,
    Claimed,
    DeadLettered,
    Delivery,
    DeliveryStatus,
    Discard,
    Discarded,
    Event,
    Fail,
    Failed,
    JobState,
    LeaseExpired,
    LeaseRenewed,
    Publish,
    Published,
    Reject,
    Renew,
    Requeued,
    Restore,
    ResultFenced,
    ResultState,
    Revoke,
    Revoked,
    ScheduleRetry,
    Start,
    Succeed,
    Succeeded,
    decide,
    event_data,
    event_from,
    event_type,
    evolve,
    fold,
)

STREAM = "task-1"
START = 1000.0
MAX_CLAIMS = 3
QUEUES = ["celery", "high", "low"]
CONSUMERS = ["w1", "w2", "w3"]
# Purging and revoking end a delivery's (or the whole task's) life, so each run draws
# how many events the log must hold before it may: early in some runs, never in others.
DESTROY_AFTER = st.integers(min_value=5, max_value=120)

times = st.floats(min_value=0.0, max_value=120.0, allow_nan=False, allow_infinity=False)
leases = st.floats(min_value=0.5, max_value=60.0, allow_nan=False, allow_infinity=False)
picks = st.integers(min_value=0, max_value=1_000)
kinds = st.sampled_from(["renew", "ack", "reject", "restore"])
countdowns = st.one_of(st.none(), st.just(0.0), st.floats(min_value=0.5, max_value=120.0))
results = st.one_of(st.none(), st.fixed_dictionaries({"value": st.integers()}))
result_commands = st.one_of(
    st.builds(Start, worker=st.sampled_from([None, *CONSUMERS]), result=results),
    st.builds(
        ScheduleRetry,
        exc=st.just("Retry()"),
        countdown=st.one_of(st.none(), times),
        result=results,
    ),
    st.builds(Succeed, result=results),
    st.builds(Fail, exc=st.just("ValueError()"), traceback=st.none(), result=results),
)


#: The events a result write records.
RESULT_EVENTS = {"Started", "StateUpdated", "RetryScheduled", "Succeeded", "Failed"}
#: The state a fenced-out result of each command reports.
RESULT_STATE = {Start: "STARTED", ScheduleRetry: "RETRY", Succeed: "SUCCESS", Fail: "FAILURE"}


def stored(events: list[Event]) -> list[Event]:
    """The events as a store writes and reads them back: type name and JSON data."""
    rows = json.loads(json.dumps([[event_type(e), event_data(e)] for e in events]))
    return [event_from(name, data) for name, data in rows]


class LifecycleMachine(RuleBasedStateMachine):
    """Random commands against one stream, checked against the folded log."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.state = JobState(stream=STREAM)
        #: The state after the last event that is not result-neutral.
        self.unneutral = self.state
        self.events: list[Event] = []
        self.finished: dict[str, Delivery] = {}  # final deliveries, as first seen final
        self.claim_ids: dict[str, list[str]] = {}  # every claim id used, per delivery
        self.counter = 0
        self.succeeded = False
        self.was_revoked = False
        self.last_version = 0
        self.purge_after = self.revoke_after = 0  # drawn by first_publish
        self.revoke_while_held = False
        self.folded: tuple[int, int] | None = None  # (id of the state, log length) last refolded

    # -- helpers --------------------------------------------------------------

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def run(self, command: Any) -> list[Event] | None:
        """Decide ``command`` now; fold and record its events, or None if refused."""
        before = self.state
        try:
            events = decide(command, self.state, self.now)
        except InvalidTransition:
            assert self.state == before  # nothing written, nothing changed
            return None
        # What a store would write and read back is the same log (so folds the same).
        assert stored(events) == events
        if isinstance(command, CLOCKLESS_RESULT_WRITES):
            # A worker's result write decides the same at any time, or none: the
            # store may decide it before its statement reads the clock -- and
            # the same on the state before the last result-neutral events.
            assert decide(command, before, math.nan) == events
            assert decide(command, before, self.now + 86400) == events
            assert decide(command, self.unneutral, self.now) == events
        state = self.state
        for new in events:
            state = evolve(state, new)
            if not isinstance(new, RESULT_NEUTRAL_EVENTS):
                self.unneutral = state
        self.state = state
        self.events.extend(events)
        return events

    def pick(self, index: int) -> str | None:
        ids = sorted(self.state.deliveries)
        return ids[index % len(ids)] if ids else None

    def held(self) -> list[str]:
        return sorted(
            d.id for d in self.state.deliveries.values() if d.status is DeliveryStatus.CLAIMED
        )

    def is_current(self, delivery_id: str, claim: str) -> bool:
        delivery = self.state.deliveries.get(delivery_id)
        return (
            delivery is not None
            and delivery.status is DeliveryStatus.CLAIMED
            and delivery.claim == claim
        )

    def stale_claim(self, delivery_id: str, index: int) -> str:
        """A claim id that is not ``delivery_id``'s current one: an old claim of it,
        a claim of another delivery, or one never issued."""
        candidates = [
            c for ids in self.claim_ids.values() for c in ids if not self.is_current(delivery_id, c)
        ]
        candidates.append("never-issued")
        return candidates[index % len(candidates)]

    # -- rules ----------------------------------------------------------------

    @initialize(
        queue=st.sampled_from(QUEUES),
        purge_after=DESTROY_AFTER,
        revoke_after=DESTROY_AFTER,
        revoke_while_held=st.booleans(),
    )
    def first_publish(
        self, queue: str, purge_after: int, revoke_after: int, revoke_while_held: bool
    ) -> None:
        self.purge_after = purge_after
        self.revoke_after = revoke_after
        # In some runs the task may also be revoked whenever a delivery is claimed, to
        # see what becomes of a delivery given back or lost after the revoke.
        self.revoke_while_held = revoke_while_held
        events = self.run(Publish(self.fresh("d"), queue, {"n": 0}))
        assert events is not None and isinstance(events[0], Published)

    @rule(
        queue=st.sampled_from(QUEUES),
        priority=st.integers(min_value=0, max_value=9),
        not_before=st.one_of(st.none(), times),
        expires=st.one_of(st.none(), st.floats(min_value=-10.0, max_value=240.0)),
        again=st.integers(min_value=0, max_value=1_000),
    )
    def publish(
        self,
        queue: str,
        priority: int,
        not_before: float | None,
        expires: float | None,
        again: int,
    ) -> None:
        if again % 10 == 0:  # the same delivery id again: a no-op on its queue
            delivery_id = self.pick(again)
            assert delivery_id is not None
            held = self.state.delivery(delivery_id).queue
            before = self.state
            if held == queue:
                assert self.run(Publish(delivery_id, queue, {})) == []
                assert self.state == before
            else:
                assert self.run(Publish(delivery_id, queue, {})) is None
            return
        delivery_id = self.fresh("d")
        command = Publish(
            delivery_id,
            queue,
            {"n": self.counter},
            priority=priority,
            not_before=None if not_before is None else self.now + not_before,
            expires=None if expires is None else self.now + expires,
        )
        events = self.run(command)
        assert events is not None
        assert events[0] == Published(
            delivery_id, queue, command.message, priority, command.not_before, command.expires
        )
        if self.state.revoked:
            assert events[1:] == [Discarded(delivery_id, "revoked")]
        else:
            assert events[1:] == []
            assert self.state.delivery(delivery_id).status is DeliveryStatus.READY

    @precondition(lambda self: self.state.deliveries)
    @rule(index=picks, consumer=st.sampled_from(CONSUMERS), lease=leases)
    def claim(self, index: int, consumer: str, lease: float) -> None:
        """Claim a delivery: mostly a pending one, sometimes any (settled ones too)."""
        pending = sorted(d.id for d in self.state.pending())
        chosen = pending[index % len(pending)] if pending and index % 4 else self.pick(index)
        assert chosen is not None
        self.claim_now(chosen, consumer, lease)

    @precondition(lambda self: self.held())
    @rule(
        index=picks, late=times, consumer=st.sampled_from(CONSUMERS), lease=leases,
        start=st.booleans(),
    )
    def lose_lease(self, index: int, late: float, consumer: str, lease: float,
                   start: bool) -> None:
        """The holder (which may have started the task first) dies: the clock runs
        past its lease and someone else claims."""
        held = self.held()
        if index % 2:
            delivery_id = held[index % len(held)]
        else:  # the one closest to dead-lettering
            delivery_id = max(held, key=lambda d: self._budget_used(self.state.delivery(d)))
        if start:
            self.run(Start("w"))
        lease_until = self.state.delivery(delivery_id).lease_until
        assert lease_until is not None
        self.now = max(self.now, lease_until + late)
        self.claim_now(delivery_id, consumer, lease)

    def finished_since_claim(self, delivery_id: str) -> bool:
        """Whether a final outcome was recorded after the delivery's last claim."""
        claimed_at = [
            n for n, e in enumerate(self.events)
            if isinstance(e, Claimed) and e.delivery == delivery_id
        ]
        return bool(claimed_at) and any(
            isinstance(e, (Succeeded, Failed)) for e in self.events[claimed_at[-1]:]
        )

    @staticmethod
    def _budget_used(d: Delivery) -> float:
        return max(d.lost_claims / MAX_CLAIMS, d.lost_unstarted / (3 * MAX_CLAIMS))

    def claim_now(self, delivery_id: str, consumer: str, lease: float) -> None:
        """Claim ``delivery_id`` now and check the outcome against the rules."""
        before = self.state.delivery(delivery_id)
        claim_id = self.fresh("c")
        command = Claim(delivery_id, claim_id, consumer, lease, max_claims=MAX_CLAIMS)
        # The rules, spelled out here rather than taken from the model's own predicates.
        lease_ran_out = before.status is DeliveryStatus.CLAIMED and (
            before.lease_until is not None and before.lease_until <= self.now
        )
        claimable = (
            not before.status.is_final
            and (before.status is not DeliveryStatus.CLAIMED or lease_ran_out)
            and (before.not_before is None or before.not_before <= self.now)
        )
        finished = self.finished_since_claim(delivery_id)
        try:
            events = decide(command, self.state, self.now)
        except NotClaimable:
            assert not claimable, f"claimable delivery {delivery_id!r} was refused"
            return
        assert claimable, f"unclaimable delivery {delivery_id!r} was claimed"
        self.run(command)
        self.claim_ids.setdefault(delivery_id, []).append(claim_id)
        after = self.state.delivery(delivery_id)
        lost, unstarted = before.lost_claims, before.lost_unstarted
        if before.status is DeliveryStatus.CLAIMED:
            assert lease_ran_out
            assert events[0] == LeaseExpired(
                delivery_id, before.claim, started=before.started  # type: ignore[arg-type]
            )
            events = events[1:]
            if before.started:
                lost += 1
            else:
                unstarted += 1
        assert len(events) == 1
        outcome = events[0]
        expired_lease = before.status is DeliveryStatus.CLAIMED
        event(f"Claim: {event_type(outcome)}" + (" after a lost lease" if expired_lease else ""))
        assert (after.lost_claims, after.lost_unstarted) == (lost, unstarted)
        if self.state.revoked:
            # Only a delivery claimed before the revoke can get here; it must not run.
            assert expired_lease
            event("lost lease after revoke")
            assert outcome == Discarded(delivery_id, "revoked")
            assert after.status is DeliveryStatus.DISCARDED
        elif finished:
            # Its run (or one beside it) recorded the task's outcome: not again.
            event("settled: outcome recorded since its claim")
            assert outcome == Discarded(delivery_id, "outcome recorded")
            assert after.status is DeliveryStatus.DISCARDED
        elif lost >= MAX_CLAIMS or unstarted >= 3 * MAX_CLAIMS:
            assert isinstance(outcome, DeadLettered)
            if lost >= MAX_CLAIMS:
                assert f"{lost} runs ended without an outcome" in outcome.reason
            else:
                event("dead-lettered after leases lost before a start")
                assert f"lost its lease {unstarted} times before it started" in outcome.reason
            assert after.status is DeliveryStatus.DEAD
            assert after.reason == outcome.reason
        elif before.expires is not None and before.expires <= self.now:
            assert outcome == Discarded(delivery_id, "expired")
            assert after.status is DeliveryStatus.DISCARDED
        else:
            assert outcome == Claimed(delivery_id, claim_id, consumer, self.now + lease)
            assert after.status is DeliveryStatus.CLAIMED
            assert (after.claim, after.consumer) == (claim_id, consumer)
            assert after.lease_until == self.now + lease
            assert after.claims == before.claims + 1
            assert after.redelivered == (before.claims > 0)

    @precondition(lambda self: self.held())
    @rule(kind=kinds, index=picks, lease=leases, requeue=st.booleans(), countdown=countdowns)
    def holder_acts(
        self, kind: str, index: int, lease: float, requeue: bool, countdown: float | None
    ) -> None:
        """The current holder renews, acks, rejects or restores: it is never refused."""
        held = self.held()
        delivery_id = held[index % len(held)]
        claim = self.state.delivery(delivery_id).claim
        assert claim is not None
        self.act(kind, delivery_id, claim, lease, requeue, countdown)

    @rule(
        kind=kinds,
        index=picks,
        stale=picks,
        lease=leases,
        requeue=st.booleans(),
        countdown=countdowns,
    )
    def stale_holder_acts(
        self,
        kind: str,
        index: int,
        stale: int,
        lease: float,
        requeue: bool,
        countdown: float | None,
    ) -> None:
        """The same with an old claim, another delivery's claim or a made-up one."""
        delivery_id = "unknown" if index % 7 == 0 else self.pick(index) or "unknown"
        self.act(kind, delivery_id, self.stale_claim(delivery_id, stale), lease, requeue, countdown)

    def act(
        self,
        kind: str,
        delivery_id: str,
        claim: str,
        lease: float,
        requeue: bool,
        countdown: float | None,
    ) -> None:
        """Run a holder's command: StaleClaim is raised exactly when ``claim`` is not
        the delivery's current claim."""
        commands: dict[str, Any] = {
            "renew": Renew(delivery_id, claim, lease),
            "ack": Ack(delivery_id, claim),
            "reject": Reject(delivery_id, claim, requeue=requeue, countdown=countdown),
            "restore": Restore(delivery_id, claim),
        }
        command = commands[kind]
        is_current = self.is_current(delivery_id, claim)
        before = self.state.deliveries.get(delivery_id)
        finished = self.finished_since_claim(delivery_id)
        try:
            decide(command, self.state, self.now)
        except StaleClaim:
            assert not is_current, f"current claim {claim!r} of {delivery_id!r} refused"
        else:
            assert is_current, f"stale claim {claim!r} of {delivery_id!r} accepted"
        events = self.run(command)
        event(f"{type(command).__name__}: {'current' if is_current else 'stale'} claim")
        if events is None:
            return
        assert before is not None
        after = self.state.delivery(delivery_id)
        # An outcome reported by the holder is never a lost claim; a requeue is a
        # run that ended without one (Celery requeues when the pool process died),
        # and so is a restore of a task that had started.
        lost_run = (kind == "reject" and requeue) or (kind == "restore" and before.started)
        assert (after.claims, after.lost_claims, after.lost_unstarted) == (
            before.claims, before.lost_claims + lost_run, before.lost_unstarted
        )
        if kind == "renew":
            assert events == [LeaseRenewed(delivery_id, claim, self.now + lease)]
            assert after.status is DeliveryStatus.CLAIMED
            assert after.lease_until == self.now + lease
        elif kind == "ack":
            assert events == [Acked(delivery_id, claim)]
            assert after.status is DeliveryStatus.ACKED
        elif kind == "restore" or requeue:
            # Given back: ready again, unless the task was revoked meanwhile.
            if kind == "restore":
                requeued = Requeued(delivery_id, claim, "restored", lost=before.started)
            else:
                not_before = self.now + countdown if countdown else None
                requeued = Requeued(delivery_id, claim, "rejected", not_before, lost=True)
            if self.state.revoked:
                event("given back after revoke")
                assert events == [requeued, Discarded(delivery_id, "revoked")]
                assert after.status is DeliveryStatus.DISCARDED
            elif finished:
                event("given back after its outcome")
                assert events == [requeued, Discarded(delivery_id, "outcome recorded")]
                assert after.status is DeliveryStatus.DISCARDED
            else:
                assert events == [requeued]
                assert after.status is DeliveryStatus.READY
                assert after.redelivered
                if requeued.not_before is not None:
                    assert after.not_before == requeued.not_before
                    assert not after.is_due(self.now)
        else:
            assert events == [DeadLettered(delivery_id, "rejected")]
            assert after.status is DeliveryStatus.DEAD

    @precondition(lambda self: len(self.events) >= self.purge_after)
    @rule(index=picks)
    def discard(self, index: int) -> None:
        delivery_id = self.pick(index)
        assert delivery_id is not None
        before = self.state.delivery(delivery_id)
        events = self.run(Discard(delivery_id, "purged"))
        if before.status is DeliveryStatus.CLAIMED:
            assert events is None
        elif before.status.is_final:
            assert events == []
        else:
            assert events == [Discarded(delivery_id, "purged")]

    @precondition(
        lambda self: (
            len(self.events) >= self.revoke_after or (self.revoke_while_held and bool(self.held()))
        )
    )
    @rule()
    def revoke(self) -> None:
        already = self.state.revoked
        events = self.run(Revoke())
        assert events is not None
        assert self.state.revoked
        if already:
            assert events == []
        else:
            assert events[0] == Revoked("revoked")
            assert not any(d.status is DeliveryStatus.READY for d in self.state.deliveries.values())

    @rule(command=result_commands)
    def result(self, command: Any) -> None:
        was_success = self.state.result_state is ResultState.SUCCESS
        events = self.run(command)
        assert events is not None
        if was_success:
            assert events == []
        else:
            assert len(events) == 1

    @precondition(lambda self: self.state.deliveries)
    @rule(
        command=result_commands, index=picks,
        which=st.sampled_from(["current", "current", "earlier", "unknown"]),
    )
    def worker_result(self, command: Any, index: int, which: str) -> None:
        """A worker records a result under the claim its message came with: the
        delivery's last claim, an earlier one, or one this stream never issued."""
        delivery_id = self.pick(index)
        assert delivery_id is not None
        claims = [e.claim for e in self.events if isinstance(e, Claimed)
                  and e.delivery == delivery_id]
        if which == "unknown" or not claims:
            claim = "issued-elsewhere"
        elif which == "current":
            claim = claims[-1]
        else:  # an earlier claim if there is one
            earlier = claims[:-1] or claims
            claim = earlier[index % len(earlier)]
        command = dataclasses.replace(command, claim=claim)
        was_success = self.state.result_state is ResultState.SUCCESS
        finished = self.finished_since_claim(delivery_id)
        events = self.run(command)
        assert events is not None
        if claim not in claims:  # as a result written from elsewhere
            assert len(events) == (0 if was_success else 1)
            assert all(e.delivery is None for e in events)  # type: ignore[attr-defined]
        elif claim != claims[-1]:
            event("result fenced out")
            assert events == [ResultFenced(delivery_id, claim, RESULT_STATE[type(command)])]
        elif was_success or finished:
            event("result after the outcome")
            assert events == []
        else:
            assert len(events) == 1
            assert events[0].delivery == delivery_id  # type: ignore[attr-defined]

    @rule(seconds=times)
    def advance_clock(self, seconds: float) -> None:
        self.now += seconds

    # -- invariants -----------------------------------------------------------

    @invariant()
    def result_neutral_events_leave_the_result_as_it_was(self) -> None:
        """What a result write derives (the results row, the task's state) is
        the same before and after the result-neutral events since."""
        fields = ("result_state", "result", "custom_state", "forgotten", "revoked",
                  "outcome_version")
        before, now = self.unneutral, self.state
        assert [getattr(before, f, None) for f in fields] == [getattr(now, f, None) for f in fields]

    @invariant()
    def folding_the_log_reproduces_the_state(self) -> None:
        # Refold only when a step changed something (the state object or the log).
        checked = (id(self.state), len(self.events))
        if checked != self.folded:
            assert fold(STREAM, self.events) == self.state
            self.folded = checked
        assert self.state.version == len(self.events)
        assert self.state.version >= self.last_version
        self.last_version = self.state.version

    @invariant()
    def claims_are_consistent(self) -> None:
        current_claims = [
            d.claim for d in self.state.deliveries.values() if d.status is DeliveryStatus.CLAIMED
        ]
        assert len(current_claims) == len(set(current_claims))
        last_claim: dict[str, str] = {}
        for e in self.events:
            if isinstance(e, Claimed):
                last_claim[e.delivery] = e.claim
        for d in self.state.deliveries.values():
            if d.status is DeliveryStatus.CLAIMED:
                assert d.claim is not None
                assert d.consumer is not None
                assert d.lease_until is not None
                assert d.claim == last_claim[d.id]
            elif d.status is DeliveryStatus.READY:
                assert (d.claim, d.consumer, d.lease_until) == (None, None, None)
            else:
                assert d.lease_until is None

    @invariant()
    def final_deliveries_never_change(self) -> None:
        for delivery_id, snapshot in self.finished.items():
            assert self.state.deliveries[delivery_id] == snapshot
        for d in self.state.deliveries.values():
            if d.status.is_final:
                self.finished.setdefault(d.id, d)

    @invariant()
    def claim_counters_are_bounded(self) -> None:
        claimed = Counter(e.delivery for e in self.events if isinstance(e, Claimed))
        lost = Counter(
            e.delivery for e in self.events
            if (isinstance(e, LeaseExpired) and e.started) or (isinstance(e, Requeued) and e.lost)
        )
        unstarted = Counter(
            e.delivery for e in self.events if isinstance(e, LeaseExpired) and not e.started
        )
        for d in self.state.deliveries.values():
            assert d.claims >= d.lost_claims + d.lost_unstarted
            assert d.lost_claims <= MAX_CLAIMS
            assert d.lost_unstarted <= 3 * MAX_CLAIMS
            assert (d.claims, d.lost_claims, d.lost_unstarted) == (
                claimed[d.id], lost[d.id], unstarted[d.id]
            )
            if d.lost_claims == MAX_CLAIMS or d.lost_unstarted == 3 * MAX_CLAIMS:
                # Given back with its budget spent: the next claim dead-letters it.
                assert d.status is not DeliveryStatus.CLAIMED

    @invariant()
    def started_means_a_result_since_the_claim(self) -> None:
        """A claimed delivery has started exactly when a result event followed its
        claim: one naming it, or one naming none (which marks every claimed one)."""
        since_claim: dict[str, bool] = {}
        for e in self.events:
            if isinstance(e, Claimed):
                since_claim[e.delivery] = False
            elif type(e).__name__ in RESULT_EVENTS:
                named = e.delivery  # type: ignore[attr-defined]
                if named is None:
                    since_claim = dict.fromkeys(since_claim, True)
                elif named in since_claim:
                    since_claim[named] = True
            elif isinstance(e, (LeaseExpired, Requeued, Acked, DeadLettered, Discarded)):
                since_claim.pop(e.delivery, None)
        for d in self.state.deliveries.values():
            if d.status is DeliveryStatus.CLAIMED:
                assert d.started == since_claim[d.id]

    @invariant()
    def nothing_runs_after_a_revoke(self) -> None:
        revoked_at = next(
            (n for n, e in enumerate(self.events) if isinstance(e, Revoked)), len(self.events)
        )
        assert not any(isinstance(e, Claimed) for e in self.events[revoked_at:])
        if self.state.revoked:
            assert not any(d.status is DeliveryStatus.READY for d in self.state.deliveries.values())

    @invariant()
    def redelivered_means_an_earlier_claim(self) -> None:
        for d in self.state.deliveries.values():
            earlier = d.claims - 1 if d.status is DeliveryStatus.CLAIMED else d.claims
            assert d.redelivered == (earlier > 0)

    @invariant()
    def success_and_revocation_are_sticky(self) -> None:
        if self.succeeded:
            assert self.state.result_state is ResultState.SUCCESS
        self.succeeded = self.state.result_state is ResultState.SUCCESS
        if self.was_revoked:
            assert self.state.revoked
        self.was_revoked = self.state.revoked
        if self.state.revoked and not self.succeeded:
            assert self.state.result_state in {
                ResultState.REVOKED,
                ResultState.STARTED,
                ResultState.RETRY,
                ResultState.FAILURE,
            }


TestLifecycle = LifecycleMachine.TestCase
TestLifecycle.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------------------
# A plain property: logs produced by the model's own decisions re-fold identically.
# ---------------------------------------------------------------------------


commands = st.lists(
    st.tuples(
        st.sampled_from(
            ["publish", "claim", "renew", "ack", "reject", "restore", "revoke", "tick"]
        ),
        st.integers(min_value=0, max_value=5),
        st.booleans(),
        times,
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(commands, result_commands)
def test_decided_logs_refold_identically(steps: list[Any], last: Any) -> None:
    now = START
    state = JobState(stream=STREAM)
    log: list[Event] = []
    for n, (kind, index, flag, seconds) in enumerate(steps):
        ids = sorted(state.deliveries)
        delivery_id = ids[index % len(ids)] if ids else f"d{index}"
        claim = state.deliveries[delivery_id].claim if delivery_id in state.deliveries else None
        command: Any
        if kind == "publish":
            command = Publish(
                f"d{n}", "celery", {"n": n}, not_before=now + seconds if flag else None
            )
        elif kind == "claim":
            command = Claim(delivery_id, f"c{n}", "w", seconds + 1, max_claims=MAX_CLAIMS)
        elif kind == "renew":
            command = Renew(delivery_id, claim or "x", seconds)
        elif kind == "ack":
            command = Ack(delivery_id, claim or "x")
        elif kind == "reject":
            command = Reject(delivery_id, claim or "x", requeue=flag, countdown=seconds)
        elif kind == "restore":
            command = Restore(delivery_id, claim or "x")
        elif kind == "revoke":
            command = Revoke()
        else:
            now += seconds
            continue
        try:
            events = decide(command, state, now)
        except InvalidTransition:
            continue
        for e in events:
            state = evolve(state, e)
        log.extend(events)
    for e in decide(last, state, now):
        state = evolve(state, e)
        log.append(e)
    assert fold(STREAM, log) == state
    assert fold(STREAM, stored(log)) == state
    assert state.version == len(log)
    # Every prefix of a valid log is a valid log.
    for cut in range(len(log) + 1):
        assert fold(STREAM, log[:cut]).version == cut
