"""Deliveries: publishing messages, claiming them, and settling claims.

Operations batch across messages: a claim of N messages, or an ack of N claims,
is one transaction with a handful of statements, whatever N is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from ..exceptions import InvalidTransition, MessageTooLarge, StaleClaim
from .database import Database, Tx
from .log import EventLog, Pending, decided, decode_json, evolve_all, fold
from .records import ClaimedMessage, ClaimRef, ClaimRound, NewMessage, Outcome, RecordedEvent

#: Default largest message, as stored JSON, that publish accepts.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

#: The most claims whose stream's state a process keeps for their settling: a
#: consumer holds its prefetch; more are claims it lost track of.
MOST_HELD_STATES = 10_000


@dataclass(frozen=True)
class ClaimRequest:
    """What a consumer asks for: up to ``limit`` messages of ``queues``."""

    queues: list[str]
    limit: int
    consumer: str
    lease_seconds: float
    max_claims: int | None
    #: Ask for the earliest ETA in ``queues`` later than the claim's time.
    next_due: bool = False


@dataclass(frozen=True)
class CheckedMessage:
    """A message publish has accepted, with its delivery id decided: what atomic
    enqueue holds in memory until the caller's transaction commits."""

    message: NewMessage
    command: lc.Publish

    @property
    def delivery(self) -> str:
        return self.command.delivery


class Deliveries:
    """Publish, claim, ack, reject, restore and renew."""

    def __init__(self, db: Database, log: EventLog, max_message_size: int) -> None:
        self.db = db
        self.log = log
        self.max_message_size = max_message_size
        #: Claim id -> its stream's state as the claim left it.  Settling the
        #: claim later reads only the events after it (the task's result, a
        #: renewal, another claimer's), not the whole stream: a state is a fold
        #: of the stream up to its version whoever appended since, so one that
        #: is out of date costs a longer tail, never a wrong decision.  A
        #: consumer's claiming and renewing threads share it (single dict
        #: operations, no lock: a fork may copy one held).
        self._held: dict[str, lc.JobState] = {}

    # -- publishing --------------------------------------------------------------

    def check(self, messages: Sequence[NewMessage]) -> list[CheckedMessage]:
        """Refuse what publish would refuse (:class:`MessageTooLarge`) and decide
        each message's delivery id, without touching the database."""
        return [CheckedMessage(msg, self._publish_command(msg)) for msg in messages]

    def publish(
        self, messages: Sequence[CheckedMessage], *, connection: sa.Connection | None = None
    ) -> list[str]:
        """Publish checked messages; returns their delivery ids.

        With ``connection`` the events join the caller's transaction (in a
        savepoint): they exist if and only if the caller commits.  Without it the
        store commits them itself before returning.  A batch is one append: its
        events, derived rows and one wake-up per queue.
        """
        prepared = [(c.message, c.command) for c in messages]
        # New streams need no read: version 1 is free, or the insert loses on the
        # (stream, version) key and the retry reads.  Not where a failed insert
        # cannot be rolled back alone (a caller's SQLite transaction).
        # Not on a partitioned log either: a stream born on another day would not
        # collide on (stream_id, version, born).
        guess = [
            all(m.new_stream for m, _ in prepared)
            and (connection is None or self.db.dialect.atomic_join)
            and not self.log.partitioned
        ]

        def attempt() -> list[str]:
            if guess[0] and connection is None and len(prepared) == 1 and (
                self.db.one_statement_commits and self.log.publishes_new
            ):
                # Our own transaction, and one statement: it commits as it runs.
                guess[0] = False  # one try only
                msg, command = prepared[0]
                with self.db.one_statement() as tx:
                    if self._publish_one(tx, prepared[0], {msg.stream: fold(msg.stream, ())}):
                        return [command.delivery]
            with self.db.write(connection) as tx:
                if guess[0]:
                    guess[0] = False  # one try only
                    states = {m.stream: fold(m.stream, ()) for m, _ in prepared}
                    if (
                        len(prepared) == 1 and self.log.publishes_new
                        and self._publish_one(tx, prepared[0], states)
                    ):
                        return [prepared[0][1].delivery]
                else:
                    states = self.log.load_all(tx, (m.stream for m, _ in prepared))
                pending: Pending = []
                for msg, command in prepared:
                    state = states[msg.stream]
                    events = lc.decide(command, state, tx.now)
                    pending.append((state, events, msg.metadata))
                    # Several messages of one stream in a batch build on each other.
                    states[msg.stream] = evolve_all(state, events)
                self.log.append_pending(tx, decided(pending), folded=states)
            return [command.delivery for _, command in prepared]

        return self.db.retrying(attempt)

    def _publish_one(
        self, tx: Tx, prepared: tuple[NewMessage, lc.Publish],
        states: Mapping[str, lc.JobState],
    ) -> bool:
        """One message to a new stream, in one statement where the database can
        (:meth:`.EventLog.publish_new`).  A publish is decided without the
        clock, so any time decides it as the transaction's would."""
        msg, command = prepared
        events = lc.decide(command, states[msg.stream], 0.0)
        return self.log.publish_new(tx, msg.stream, events, msg.metadata) is not None

    def _publish_command(self, msg: NewMessage) -> lc.Publish:
        size = len(json.dumps(msg.message, separators=(",", ":")))
        if size > self.max_message_size:
            raise MessageTooLarge(
                f"message for queue {msg.queue!r} is {size} bytes; "
                f"max_message_size is {self.max_message_size}"
            )
        return lc.Publish(
            delivery=msg.delivery or uuid.uuid4().hex,
            queue=msg.queue,
            message=msg.message,
            priority=msg.priority,
            not_before=msg.not_before,
            expires=msg.expires,
        )

    # -- claiming and settling ---------------------------------------------------

    def claim(
        self,
        queues: Sequence[str],
        limit: int,
        consumer: str,
        lease_seconds: float,
        *,
        max_claims: int | None = None,
    ) -> list[ClaimedMessage]:
        """Claim up to ``limit`` due messages from ``queues``, highest priority, then oldest.

        Deliveries whose lease ran out are claimable again (recorded as
        ``LeaseExpired``); one that has lost ``max_claims`` leases is dead-lettered
        instead, and one past its expiry is discarded -- neither is returned.
        """
        if limit <= 0 or not queues:
            return []
        return self.claim_round(
            [], queues, limit, consumer, lease_seconds, max_claims=max_claims
        ).claimed

    def claim_round(
        self,
        acks: Sequence[ClaimRef],
        queues: Sequence[str],
        limit: int,
        consumer: str,
        lease_seconds: float,
        *,
        max_claims: int | None = None,
        next_due: bool = False,
    ) -> ClaimRound:
        """:meth:`ack` then :meth:`claim` in one transaction -- a consumer's steady
        state (finish some, take as many more) costs one commit, not two -- and
        with ``next_due`` the earliest ETA in ``queues`` later than the claim's
        time (as :meth:`earliest_due`), found by the claim's own nomination: a
        consumer's whole round, clock and next ETA included, costs one
        transaction and no extra statement."""
        if not acks and (limit <= 0 or not queues):
            return ClaimRound({}, [])
        request = ClaimRequest(
            list(queues), limit, consumer, lease_seconds, max_claims, next_due
        )
        if not acks and self.db.dialect.single_writer:
            # Where a claim takes the one write lock (SQLite), look first: every
            # commit wakes consumers, and an empty claim holding the lock would
            # make publishers wait for nothing.  A message committed after the
            # look wakes them again.
            now = self.db.now()
            with self.db.read() as conn:
                idle = self._nominate_rows(conn, request, now, 1)
            if idle[0].delivery_id is None:
                return ClaimRound({}, [], _next_due(idle), at=now)

        def attempt() -> ClaimRound:
            with self.db.write(durable=False) as tx:
                return self._settle_and_claim(tx, acks, _ack, request)

        return self.db.retrying(attempt)

    def earliest_due(self, queues: Sequence[str], after: float) -> float | None:
        """The earliest ETA later than ``after`` (epoch seconds, the store's clock)
        of a message waiting in ``queues``, or None: when a consumer of them has
        something to claim next if nothing wakes it sooner."""
        names = sorted(set(queues))
        if not names:
            return None
        queries = self.log.queries
        params = {"after": after, **{f"queue_{i}": q for i, q in enumerate(names)}}
        with self.db.read() as conn:
            due = conn.execute(queries.earliest_due(len(names)), params).scalar()
        return None if due is None else float(due)

    def ack(self, refs: Sequence[ClaimRef]) -> dict[str, Outcome]:
        """Record that the claims' holders finished; stale claims write nothing."""
        return self._settle(refs, _ack)

    def reject(
        self, refs: Sequence[ClaimRef], *, requeue: bool, reason: str = "rejected"
    ) -> dict[str, Outcome]:
        """Give claims back to their queue (``requeue``) or dead-letter them."""
        # A dead letter is a verdict worth keeping through a crash.
        return self._settle(
            refs, lambda r: lc.Reject(r.delivery, r.claim, requeue, reason), durable=not requeue
        )

    def restore(self, refs: Sequence[ClaimRef]) -> dict[str, Outcome]:
        """Give back claims a consumer holds as it shuts down cleanly."""
        return self._settle(refs, lambda r: lc.Restore(r.delivery, r.claim))

    def renew(self, refs: Sequence[ClaimRef], lease_seconds: float) -> dict[str, Outcome]:
        """Extend the leases of claims still current; stale ones are reported."""
        return self._settle(refs, lambda r: lc.Renew(r.delivery, r.claim, lease_seconds))

    def _settle(
        self,
        refs: Sequence[ClaimRef],
        command_for: Callable[[ClaimRef], lc.Command],
        *,
        durable: bool = False,
    ) -> dict[str, Outcome]:
        """Apply a claim-fenced command to each ref in one transaction."""
        if not refs:
            return {}

        def attempt() -> dict[str, Outcome]:
            with self.db.write(durable=durable) as tx:
                return self._settle_and_claim(tx, refs, command_for, None).outcomes

        return self.db.retrying(attempt)

    def _settle_and_claim(
        self,
        tx: Tx,
        refs: Sequence[ClaimRef],
        command_for: Callable[[ClaimRef], lc.Command],
        request: ClaimRequest | None,
    ) -> ClaimRound:
        """Decide claim-fenced commands for ``refs``, then claim, in one transaction:
        one nomination (which brings the clock and the next ETA), one read of every
        stream involved that it cannot fold unread, one append.

        A consumer's steady round reads nothing: the streams it settles are
        carried on from the states its claims left by the events the nomination
        brings (where it only says whether they moved, only if none did), and a
        fresh message's stream is its one publish, which the nomination brings
        too.  Nothing is locked for the refs: a racing
        re-claim of the same delivery makes one of the two appends lose on the
        ``(stream, version)`` key, and the loser is retried from a fresh read.
        """
        nominating = request is not None and request.limit > 0 and bool(request.queues)
        # The nomination brings the clock, so a round that reads nothing has it.
        known = self._known(refs) if nominating else {}
        candidates, next_due, tails = self._nominate(tx, request, known)
        nominated = len(candidates)
        claimed = {c.stream_id for c in candidates}
        known = {stream: state for stream, state in known.items() if stream not in claimed}
        unread: dict[str, list[RecordedEvent]] = {}
        if tails is not None:
            unread.update((stream, tails.get(stream, [])) for stream in known)
        bodies: dict[str, Any] = {}  # delivery -> the message, decoded once
        settled = {r.stream for r in refs}
        for candidate in candidates:
            if self._fresh(candidate) and candidate.stream_id not in settled:
                published = self.log.recorded_publish(candidate)
                if published is not None:
                    unread[candidate.stream_id] = [published[0]]
                    bodies[candidate.delivery_id] = published[1]
        streams = self.log.read_streams(
            tx,
            [r.stream for r in refs if r.stream not in unread]
            + [c.stream_id for c in candidates if c.stream_id not in unread],
            after={s: state.version for s, state in known.items() if s not in unread},
        )
        streams.update(unread)
        states, unreadable = self.log.fold_readable(tx, streams, known)
        # A claim on a stream that cannot be read can only be fenced out.
        fenced = {r.delivery: Outcome.STALE for r in refs if r.stream in unreadable}
        refs = [r for r in refs if r.stream not in unreadable]
        candidates = [c for c in candidates if c.stream_id not in unreadable]
        pending: Pending = []
        # Settle first: a stream acked here and claimed again (a retry) continues
        # from the ack.
        outcomes = _decide_settlements(refs, command_for, states, pending, tx.now)
        claims = []
        if request is not None:
            claims = _decide_claims(request, candidates, states, pending, tx.now)
        _, final = self.log.append_pending(
            tx, decided(pending), read_positions=False, folded=states
        )
        self._hold(refs, claims, final)
        data = {c.delivery_id: c.data for c in candidates}
        for _, delivery, _ in claims:
            if delivery not in bodies:
                bodies[delivery] = decode_json(data[delivery])["message"]
        return ClaimRound(
            {**outcomes, **fenced}, _claimed_messages(claims, final, bodies, tx.now), next_due,
            nominated, at=tx.now,
        )

    def _fresh(self, candidate: Any) -> bool:
        """Whether a nominated delivery's stream is its one publish, so that the
        nomination's row is all there is to fold (not on a partitioned log,
        where a read holds the stream against a prune's move first)."""
        return (
            candidate.version == 1 and candidate.last_version == 1
            and not self.log.partitioned
        )

    def _known(self, refs: Sequence[ClaimRef]) -> dict[str, lc.JobState]:
        """The held states of the refs' streams that need no whole read in a
        consumer's round: a stream settled once in it (and, the caller sees to
        it, not claimed in it).  A plain settle (:meth:`ack`, :meth:`renew`...)
        reads whole streams, and so finds a row corrupted under its holder."""
        if not self._held or self.log.partitioned:
            return {}  # on a partitioned log, a stream may have moved since
        settled: dict[str, int] = {}
        for ref in refs:
            settled[ref.stream] = settled.get(ref.stream, 0) + 1
        known = {}
        for ref in refs:
            state = self._held.get(ref.claim)
            if state is not None and settled[ref.stream] == 1:
                known[ref.stream] = state
        return known

    def _hold(
        self, refs: Sequence[ClaimRef], claims: Sequence[tuple[str, str, str]],
        final: Mapping[str, lc.JobState],
    ) -> None:
        """Keep the states the round's claims (and renewals) left; forget those
        of claims it settled."""
        for ref in refs:
            state = final.get(ref.stream)  # the streams this round appended to
            if state is not None and _still_held(state, ref):
                self._held[ref.claim] = state  # a renewal
            else:
                self._held.pop(ref.claim, None)
        for stream, _, claim_id in claims:
            self._held[claim_id] = final[stream]
        while len(self._held) > MOST_HELD_STATES:  # the oldest first
            try:
                del self._held[next(iter(self._held))]
            except (StopIteration, RuntimeError, KeyError):  # another thread's round
                break

    def _nominate(
        self, tx: Tx, request: ClaimRequest | None, known: Mapping[str, lc.JobState]
    ) -> tuple[Sequence[Any], float | None, dict[str, list[RecordedEvent]] | None]:
        """The due deliveries to try to claim, the next ETA if the request asks
        for it, and the events appended to the ``known`` streams past the states
        held for them, by stream (None: unknown, they must be read); the
        transaction's clock comes with them."""
        if request is None or request.limit <= 0 or not request.queues:
            return (), None, None
        clock_wanted = tx.clock_wanted
        rows = self._nominate_rows(
            tx.conn, request, None if clock_wanted else tx.now, request.limit,
            relaxed=clock_wanted and tx.relaxed,
            known={stream: state.version for stream, state in known.items()},
        )
        if clock_wanted:
            tx.clock_read(float(rows[0].tx_clock))
        candidates = [r for r in rows if r.delivery_id is not None]
        return candidates, _next_due(rows), self._tails(rows[0], known)

    def _tails(
        self, row: Any, known: Mapping[str, lc.JobState]
    ) -> dict[str, list[RecordedEvent]] | None:
        """The tails of the ``known`` streams from a nomination's row: the events
        it brought (``known_tails``), or none at all when it found that no
        stream moved (``known_last``); None when they must be read."""
        if not known:
            return None
        if self.log.queries.tails_in_nomination:
            tails: dict[str, list[RecordedEvent]] = {}
            for event in decode_json(row.known_tails) or ():
                stream = event["stream_id"]
                if event["version"] > known[stream].version:  # the query's is the lowest
                    tails.setdefault(stream, []).append(
                        self.log.recorded(SimpleNamespace(metadata=None, **event))
                    )
            return tails
        held = sum(state.version for state in known.values())
        if row.known_last is not None and int(row.known_last) == held:
            return {}
        return None

    def _nominate_rows(
        self, conn: sa.Connection, request: ClaimRequest, now: float | None, limit: int,
        *, relaxed: bool = False, known: Mapping[str, int] | None = None,
    ) -> Sequence[Any]:
        """The nomination's rows: at least one (the clock's)."""
        queries = self.log.queries
        queues = list(dict.fromkeys(request.queues))
        return conn.execute(
            queries.nominate(len(queues)),
            queries.nominate_params(
                queues, now, limit, relaxed=relaxed, next_due=request.next_due, known=known
            ),
        ).all()


def _next_due(rows: Sequence[Any]) -> float | None:
    """The next ETA a nomination's rows bring (the same on every row)."""
    due = rows[0].next_due
    return None if due is None else float(due)


def _still_held(state: lc.JobState, ref: ClaimRef) -> bool:
    """Whether ``ref``'s claim is its delivery's current one in ``state``."""
    try:
        delivery = state.delivery(ref.delivery)
    except InvalidTransition:
        return False
    return delivery.claim == ref.claim and delivery.status is lc.DeliveryStatus.CLAIMED


def _ack(ref: ClaimRef) -> lc.Command:
    return lc.Ack(ref.delivery, ref.claim)


def _decide_settlements(
    refs: Sequence[ClaimRef],
    command_for: Callable[[ClaimRef], lc.Command],
    states: dict[str, lc.JobState],
    pending: Pending,
    now: float,
) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for ref in refs:
        state = states[ref.stream]
        try:
            events = lc.decide(command_for(ref), state, now)
        except StaleClaim:
            outcomes[ref.delivery] = Outcome.STALE
            continue
        pending.append((state, events, None))
        states[ref.stream] = evolve_all(state, events)
        outcomes[ref.delivery] = Outcome.DONE
    return outcomes


def _decide_claims(
    request: ClaimRequest,
    candidates: Iterable[Any],
    states: dict[str, lc.JobState],
    pending: Pending,
    now: float,
) -> list[tuple[str, str, str]]:
    """Claim each nominated delivery still claimable; ``(stream, delivery, claim)``."""
    claims = []
    for candidate in candidates:
        delivery, stream = candidate.delivery_id, candidate.stream_id
        claim_id = uuid.uuid4().hex
        command = lc.Claim(
            delivery, claim_id, request.consumer, request.lease_seconds, request.max_claims
        )
        try:
            events = lc.decide(command, states[stream], now)
        except InvalidTransition:
            continue  # settled or re-claimed since nomination: move on
        pending.append((states[stream], events, None))
        states[stream] = evolve_all(states[stream], events)
        if isinstance(events[-1], lc.Claimed):
            claims.append((stream, delivery, claim_id))
    return claims


def _claimed_messages(
    claims: Sequence[tuple[str, str, str]],
    final: Mapping[str, lc.JobState],
    bodies: Mapping[str, Any],
    now: float,
) -> list[ClaimedMessage]:
    """The claimed deliveries with their ``bodies`` (delivery -> the message its
    publish holds, as the nomination read it)."""
    out = []
    for stream, delivery, claim_id in claims:
        d = final[stream].delivery(delivery)
        out.append(ClaimedMessage(
            delivery=delivery,
            claim=claim_id,
            stream=stream,
            queue=d.queue,
            message=bodies[delivery],
            priority=d.priority,
            lease_until=d.lease_until or now,
            redelivered=d.redelivered,
            state=final[stream],
        ))
    return out
