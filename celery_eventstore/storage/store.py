"""The event store: the log, the queue projection, and the operations on them.

Every write follows one path: read the streams involved, fold them
(:func:`~celery_eventstore.lifecycle.fold`), ask
:func:`~celery_eventstore.lifecycle.decide` for the events, append them at the
next versions -- the unique ``(stream_id, version)`` key makes the loser of any
race fail -- and update the projections in the same transaction.  A lost race
is retried from a fresh read; the caller never sees it unless it asked for an
explicit expected version.

Operations batch across messages: a claim of N messages, or an ack of N claims,
is one transaction with a handful of statements, whatever N is.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa

from .. import lifecycle as lc
from ..exceptions import (
    ConcurrencyConflict,
    CorruptStream,
    DatabaseUnavailable,
    InvalidTransition,
    InvalidURL,
    MessageTooLarge,
    SchemaMissing,
    SchemaOutdated,
    SchemaTooNew,
    StaleClaim,
)
from .dialects import Dialect, Listener, dialect_for
from .migrations import Migrator
from .projection import project
from .records import (
    ClaimedMessage,
    ClaimRef,
    DeadLetter,
    NewMessage,
    Outcome,
    QueueStats,
    RecordedEvent,
)
from .routing import RoutingMixin
from .schema import SCHEMA_VERSION, Tables, make_tables

T = TypeVar("T")
#: ``progress(done, total)``: how a long operation reports how far it got.
Progress = Callable[[int, int], None]

#: Default largest message, as stored JSON, that publish accepts.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: How often a lost race is retried before ConcurrencyConflict reaches the caller.
CONFLICT_RETRIES = 20
#: How often the host/database clock offset is measured again.
CLOCK_REFRESH_SECONDS = 30.0


def parse_url(url: str | sa.URL) -> sa.URL:
    try:
        return sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # The URL may hold a password: say what is wrong without echoing it.
        raise InvalidURL() from None


def redact(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


class EventStore(RoutingMixin):
    """An event store on one database.

    :param url: a SQLAlchemy URL (``postgresql://...``, ``sqlite:///jobs.db``).
    :param table_prefix: prefix of every table, so applications can share a database.
    :param schema: PostgreSQL schema holding the tables (default: the search path).
    :param clock: a function returning epoch seconds; by default the database's
        clock on PostgreSQL (so leases mean the same on every host), the host's on
        SQLite.  Tests inject one to move time without sleeping.
    :param auto_migrate: create or upgrade the schema on first use instead of
        failing with :class:`SchemaMissing`.
    :param notify: send NOTIFY on commit when messages become ready (PostgreSQL).
        Turn off behind PgBouncer's transaction pooling, where LISTEN cannot work.
    :param max_message_size: the largest message accepted by publish, in bytes of JSON.
    :param async_commit: commit claims, acks, lease renewals and STARTED states
        without waiting for the disk (PostgreSQL ``synchronous_commit=off``).  Only a
        crash of the database server can lose them, and losing one means a
        redelivery, which at-least-once delivery allows.  Publishes and results are
        always durable.
    """

    def __init__(
        self,
        url: str | sa.URL,
        *,
        table_prefix: str = "eventstore_",
        schema: str | None = None,
        clock: Callable[[], float] | None = None,
        auto_migrate: bool = False,
        notify: bool = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        async_commit: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        parsed = parse_url(url)
        self.dialect: Dialect = dialect_for(parsed)
        self.url = self.dialect.normalize_url(parsed)
        self.tables: Tables = make_tables(table_prefix, schema)
        self.table_prefix = table_prefix
        self.schema = schema
        self.auto_migrate = auto_migrate
        self.notify_enabled = notify and self.dialect.supports_notify
        self.max_message_size = max_message_size
        self.async_commit = async_commit
        #: The NOTIFY channel consumers LISTEN on; the payload is the queue name.
        namespace = f"{schema}.{table_prefix}" if schema else table_prefix
        self.channel = f"{namespace}ready"
        #: The NOTIFY channel result waiters LISTEN on; the payload is the stream id.
        self.results_channel = f"{namespace}results"
        options = {**self.dialect.engine_options(self.url), **(engine_options or {})}
        try:
            self.engine = sa.create_engine(self.url, **options)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise InvalidURL(f"cannot use {redact(self.url)}: {exc}") from None
        self.dialect.configure(self.engine)
        self._statements = _Statements(self.tables, self.dialect)
        self._clock = clock
        self._clock_offset: float | None = None
        self._clock_measured = 0.0
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"<EventStore {redact(self.url)} prefix={self.table_prefix!r}>"

    # -- connections, transactions and errors --------------------------------

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A write transaction of the store's own, for several operations that
        must commit together (pass it as ``connection=``)."""
        with self._write() as conn:
            yield conn

    def ping(self) -> None:
        """Check that the database answers and the schema is in place."""
        with self._read() as conn:
            conn.execute(sa.select(1)).scalar_one()

    def maintenance_warnings(self) -> list[str]:
        """Database settings that will slow the store down (PostgreSQL's autovacuum
        switched off), each as a sentence for an operator; empty when all is well."""
        with self._read() as conn:
            return self.dialect.maintenance_warnings(conn)

    def listener(self, *, results: bool = False) -> Listener:
        """A new :class:`~.dialects.Listener` for "messages may be ready" wake-ups
        (or, with ``results``, for "a result was recorded").

        With ``notify`` off (PgBouncer) a PostgreSQL store gives a listener that
        never wakes: consumers fall back to their periodic poll.
        """
        self._ensure_schema()
        with self._translate_errors():
            if self.dialect.supports_notify and not self.notify_enabled:
                return _SilentListener()
            channel = self.results_channel if results else self.channel
            return self.dialect.listener(self.engine, [channel])

    def after_fork(self) -> None:
        """Drop pooled connections inherited from a parent process without closing them."""
        self.engine.dispose(close=False)

    @contextlib.contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated or isinstance(
                exc, (sa.exc.OperationalError, sa.exc.InterfaceError)
            ) and not self.dialect.is_conflict(exc):
                raise DatabaseUnavailable(
                    f"database {redact(self.url)} is unavailable: {_first_line(exc.orig)}"
                ) from exc
            raise

    @contextlib.contextmanager
    def _write(
        self, connection: sa.Connection | None = None, *, durable: bool = True
    ) -> Iterator[sa.Connection]:
        """A write transaction: our own, or joined to the caller's.

        ``durable=False`` marks work whose loss only causes a redelivery.
        """
        self._ensure_schema()
        # Measure the clock (when due) before taking a connection, so the
        # transaction's own now() never needs a second one from the pool.
        self.now()
        with self._translate_errors():
            if connection is not None:
                with self.dialect.join(connection):
                    yield connection
            else:
                with self.engine.begin() as conn:
                    self.dialect.set_durability(conn, durable or not self.async_commit)
                    yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        self._ensure_schema()
        with self._translate_errors(), self.engine.connect() as conn:
            conn = conn.execution_options(**self.dialect.read_options())
            with conn.begin():
                yield conn

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` (one whole transaction) again while it loses races."""
        for tries in range(CONFLICT_RETRIES):
            try:
                return attempt()
            except sa.exc.DBAPIError as exc:
                if not self.dialect.is_conflict(exc):
                    raise
                # Jittered backoff, so racers stop colliding in lock-step.
                time.sleep(random.uniform(0, 0.002 * 2 ** min(tries, 6)))
        raise ConcurrencyConflict(f"gave up after {CONFLICT_RETRIES} lost races")

    # -- the clock -----------------------------------------------------------

    def now(self) -> float:
        """Epoch seconds by the store's clock (the database's on PostgreSQL)."""
        if self._clock is not None:
            return self._clock()
        query = self.dialect.clock_query()
        if query is None:
            return time.time()
        local = time.time()
        if self._clock_offset is None or local - self._clock_measured > CLOCK_REFRESH_SECONDS:
            with self._translate_errors(), self.engine.connect() as conn:
                before = time.time()
                db_now = float(conn.execute(query).scalar_one())
                after = time.time()
            self._clock_offset = db_now - (before + after) / 2
            self._clock_measured = after
            local = after
        return local + self._clock_offset

    def clock_skew(self) -> float:
        """Database clock minus this host's clock, in seconds (0 on SQLite)."""
        self._clock_offset = None
        saved, self._clock = self._clock, None
        try:
            self.now()
        finally:
            self._clock = saved
        return self._clock_offset or 0.0

    # -- schema --------------------------------------------------------------

    def schema_version(self) -> int:
        """The migration level of the database (0 when the tables do not exist)."""
        # Read-only on purpose: on SQLite it must not wait for a write lock that
        # an application's open transaction (an atomic enqueue) may be holding.
        with self._translate_errors(), self.engine.connect() as conn:
            conn = conn.execution_options(**self.dialect.read_options())
            return Migrator(self.dialect, self.table_prefix, self.schema).current(conn)

    def migrate(self, to_version: int = SCHEMA_VERSION) -> list[int]:
        """Create or upgrade the schema (up to ``to_version``); returns the versions applied."""
        with self._translate_errors(), self.engine.begin() as conn:
            self.dialect.set_durability(conn, True)
            applied = Migrator(self.dialect, self.table_prefix, self.schema).apply(conn, to_version)
        self._schema_ready = to_version == SCHEMA_VERSION
        return applied

    def migration_sql(self, from_version: int = 0) -> str:
        """The SQL :meth:`migrate` would run from ``from_version``, for a DBA to review."""
        migrator = Migrator(self.dialect, self.table_prefix, self.schema)
        return migrator.script(self.engine.dialect, from_version)

    def check_schema(self) -> None:
        """Raise unless the schema is exactly the version this code expects."""
        version = self.schema_version()
        if version == 0:
            raise SchemaMissing()
        if version < SCHEMA_VERSION:
            raise SchemaOutdated(
                f"the event store's schema is at version {version}, this code needs "
                f"{SCHEMA_VERSION}: run `celery-eventstore migrate --url URL`"
            )
        if version > SCHEMA_VERSION:
            raise SchemaTooNew()

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        # Look first (a read), migrate only when behind: an up-to-date schema then
        # costs no write lock, which matters inside an application's transaction.
        if self.auto_migrate and self.schema_version() < SCHEMA_VERSION:
            self.migrate()
        self.check_schema()
        self._schema_ready = True

    # -- reading the log -----------------------------------------------------

    def _recorded(self, row: Any) -> RecordedEvent:
        return RecordedEvent(
            position=row.position,
            stream=row.stream_id,
            version=row.version,
            event=lc.event_from(row.type, row.data),
            metadata=row.metadata,
            recorded_at=row.recorded_at,
        )

    def _read_streams(
        self, conn: sa.Connection, streams: Iterable[str]
    ) -> dict[str, list[RecordedEvent]]:
        wanted = sorted(set(streams))
        found: dict[str, list[RecordedEvent]] = {s: [] for s in wanted}
        if not wanted:
            return found
        rows = conn.execute(self._statements.read_streams, {"streams": wanted})
        for row in rows:
            found[row.stream_id].append(self._recorded(row))
        return found

    def _load(self, conn: sa.Connection, streams: Iterable[str]) -> dict[str, lc.JobState]:
        states = {}
        for stream, recorded in self._read_streams(conn, streams).items():
            states[stream] = _fold(stream, recorded)
        return states

    def read_stream(self, stream: str) -> list[RecordedEvent]:
        """Every event of one stream, oldest first."""
        with self._read() as conn:
            return self._read_streams(conn, [stream])[stream]

    def load(self, stream: str) -> lc.JobState:
        """One stream folded into its current state."""
        return _fold(stream, self.read_stream(stream))

    def read_all(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Events of every stream with a position above ``after``, in log order."""
        ev = self.tables.events
        with self._read() as conn:
            rows = conn.execute(
                sa.select(ev).where(ev.c.position > after).order_by(ev.c.position).limit(limit)
            )
            return [self._recorded(row) for row in rows]

    def read_positions(self, positions: Iterable[int]) -> list[RecordedEvent]:
        """The events at these log positions that exist (are committed) now."""
        wanted = sorted(set(positions))
        if not wanted:
            return []
        ev = self.tables.events
        with self._read() as conn:
            rows = conn.execute(
                sa.select(ev).where(ev.c.position.in_(wanted)).order_by(ev.c.position)
            )
            return [self._recorded(row) for row in rows]

    # -- appending -----------------------------------------------------------

    def _append(
        self,
        conn: sa.Connection,
        pending: Sequence[tuple[lc.JobState, Sequence[lc.Event], Mapping[str, Any] | None]],
        now: float,
        *,
        read_positions: bool = True,
    ) -> tuple[list[RecordedEvent], dict[str, lc.JobState]]:
        """Append each stream's events after the state it was decided on, and project.

        ``read_positions=False`` (claims, acks, renewals, whose records never leave
        the store) skips reading back the log positions -- a RETURNING costs about a
        third of the insert -- unless an event's projection needs its position.
        Such records carry position 0.
        """
        rows: list[dict[str, Any]] = []
        states: dict[str, lc.JobState] = {}
        for state, events, metadata in pending:
            for offset, event in enumerate(events, start=1):
                rows.append(
                    {
                        "stream_id": state.stream,
                        "version": state.version + offset,
                        "type": lc.event_type(event),
                        "data": lc.event_data(event),
                        "metadata": dict(metadata) if metadata else None,
                        "recorded_at": now,
                    }
                )
            for event in events:
                state = lc.evolve(state, event)
            states[state.stream] = state
        if not rows:
            return [], states
        ev = self.tables.events
        all_events = [e for _, events, _ in pending for e in events]
        positions: Sequence[int]
        if read_positions or any(isinstance(e, _POSITIONED) for e in all_events):
            positions = conn.execute(
                ev.insert().returning(ev.c.position, sort_by_parameter_order=True), rows
            ).scalars().all()
        else:
            conn.execute(ev.insert(), rows)
            positions = [0] * len(rows)
        recorded = [
            RecordedEvent(
                position=pos,
                stream=row["stream_id"],
                version=row["version"],
                event=event,
                metadata=row["metadata"],
                recorded_at=now,
            )
            for pos, row, event in zip(positions, rows, all_events, strict=True)
        ]
        project(conn, self.tables, self.dialect, recorded, states)
        if self.notify_enabled:
            ready = _newly_ready(recorded, states, now)
            if ready:
                self.dialect.notify(conn, self.channel, ready)
            finished = {r.stream for r in recorded if isinstance(r.event, _FINISHING)}
            if finished:
                self.dialect.notify(conn, self.results_channel, finished)
        return recorded, states

    def append(
        self,
        stream: str,
        events: Sequence[lc.Event],
        expected_version: int,
        *,
        metadata: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` to ``stream`` if it is at ``expected_version``.

        Raises :class:`ConcurrencyConflict` when the stream moved on, and
        :class:`CorruptStream` when the events do not follow from the stream.
        """
        try:
            with self._write(connection) as conn:
                state = self._load(conn, [stream])[stream]
                if state.version != expected_version:
                    raise ConcurrencyConflict(
                        f"stream {stream!r} is at version {state.version}, "
                        f"not {expected_version}"
                    )
                recorded, _ = self._append(conn, [(state, events, metadata)], self.now())
                return recorded
        except sa.exc.DBAPIError as exc:
            if self.dialect.is_conflict(exc):
                raise ConcurrencyConflict(
                    f"stream {stream!r} moved past version {expected_version}"
                ) from None
            raise

    def execute(
        self,
        stream: str,
        command: lc.Command,
        *,
        metadata: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
    ) -> list[RecordedEvent]:
        """Decide ``command`` on the stream's current state and append the result.

        Lost races are retried from a fresh read; an illegal command raises
        :class:`~celery_eventstore.exceptions.InvalidTransition`.
        """

        durable = not isinstance(command, (lc.Start, lc.UpdateState))

        def attempt() -> list[RecordedEvent]:
            with self._write(connection, durable=durable) as conn:
                if isinstance(command, lc.CountChordPart):  # many writers, one stream
                    self.dialect.lock_stream(conn, self.table_prefix + stream)
                state = self._load(conn, [stream])[stream]
                now = self.now()
                events = lc.decide(command, state, now)
                return self._append(conn, [(state, events, metadata)], now)[0]

        return self._retrying(attempt)

    # -- publishing ----------------------------------------------------------

    def publish(
        self, messages: Sequence[NewMessage], *, connection: sa.Connection | None = None
    ) -> list[str]:
        """Publish messages; returns their delivery ids.

        With ``connection`` the events join the caller's transaction (in a
        savepoint): they exist if and only if the caller commits.  Without it the
        store commits them itself before returning.
        """
        prepared = []
        for msg in messages:
            size = len(json.dumps(msg.message, separators=(",", ":")))
            if size > self.max_message_size:
                raise MessageTooLarge(
                    f"message for queue {msg.queue!r} is {size} bytes; "
                    f"max_message_size is {self.max_message_size}"
                )
            delivery = msg.delivery or uuid.uuid4().hex
            prepared.append((msg, lc.Publish(
                delivery=delivery,
                queue=msg.queue,
                message=msg.message,
                priority=msg.priority,
                not_before=msg.not_before,
                expires=msg.expires,
            )))

        # New streams need no read: version 1 is free, or the insert loses on the
        # (stream, version) key and the retry reads.  Not where a failed insert
        # cannot be rolled back alone (a caller's SQLite transaction).
        guess = [
            all(m.new_stream for m, _ in prepared)
            and (connection is None or self.dialect.atomic_join)
        ]

        def attempt() -> list[str]:
            with self._write(connection) as conn:
                if guess[0]:
                    guess[0] = False  # one try only
                    states = {m.stream: _fold(m.stream, ()) for m, _ in prepared}
                else:
                    states = self._load(conn, (m.stream for m, _ in prepared))
                now = self.now()
                pending = []
                for msg, command in prepared:
                    state = states[msg.stream]
                    events = lc.decide(command, state, now)
                    pending.append((state, events, msg.metadata))
                    # Several messages of one stream in a batch build on each other.
                    for event in events:
                        state = lc.evolve(state, event)
                    states[msg.stream] = state
                self._append(conn, _chain(pending), now)
            return [command.delivery for _, command in prepared]

        return self._retrying(attempt)

    # -- consuming -----------------------------------------------------------

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
        return self.ack_and_claim([], queues, limit, consumer, lease_seconds,
                                  max_claims=max_claims)[1]

    def ack_and_claim(
        self,
        acks: Sequence[ClaimRef],
        queues: Sequence[str],
        limit: int,
        consumer: str,
        lease_seconds: float,
        *,
        max_claims: int | None = None,
    ) -> tuple[dict[str, Outcome], list[ClaimedMessage]]:
        """:meth:`ack` then :meth:`claim` in one transaction: a consumer's steady
        state (finish some, take as many more) costs one commit, not two."""
        if not acks and (limit <= 0 or not queues):
            return {}, []
        claim = _ClaimRequest(list(queues), limit, consumer, lease_seconds, max_claims)

        def attempt() -> tuple[dict[str, Outcome], list[ClaimedMessage]]:
            with self._write(durable=False) as conn:
                return self._settle_and_claim(
                    conn, acks, lambda r: lc.Ack(r.delivery, r.claim), claim
                )

        return self._retrying(attempt)

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
            with self._write(durable=durable) as conn:
                return self._settle_and_claim(conn, refs, command_for, None)[0]

        return self._retrying(attempt)

    def _settle_and_claim(
        self,
        conn: sa.Connection,
        refs: Sequence[ClaimRef],
        command_for: Callable[[ClaimRef], lc.Command],
        claim: _ClaimRequest | None,
    ) -> tuple[dict[str, Outcome], list[ClaimedMessage]]:
        """Decide claim-fenced commands for ``refs``, then claim, in ``conn``'s
        transaction: one nomination, one read of every stream involved, one append.

        Nothing is locked for the refs: a racing re-claim of the same delivery
        makes one of the two appends lose on the ``(stream, version)`` key, and the
        loser is retried from a fresh read.
        """
        now = self.now()
        candidates: Sequence[Any] = ()
        if claim is not None and claim.limit > 0 and claim.queues:
            candidates = conn.execute(
                self._statements.nominate,
                {"queues": claim.queues, "now": now, "limit": claim.limit},
            ).all()
        streams = self._read_streams(
            conn, [r.stream for r in refs] + [c.stream_id for c in candidates]
        )
        states = {s: _fold(s, recs) for s, recs in streams.items()}
        outcomes: dict[str, Outcome] = {}
        pending: _Pending = []
        # Settle first: a stream acked here and claimed again (a retry) continues
        # from the ack.
        for ref in refs:
            state = states[ref.stream]
            try:
                events = lc.decide(command_for(ref), state, now)
            except StaleClaim:
                outcomes[ref.delivery] = Outcome.STALE
                continue
            pending.append((state, events, None))
            states[ref.stream] = _evolve_all(state, events)
            outcomes[ref.delivery] = Outcome.DONE
        claims: list[tuple[str, str, str]] = []
        if claim is not None:
            for delivery, stream in candidates:
                claim_id = uuid.uuid4().hex
                command = lc.Claim(
                    delivery, claim_id, claim.consumer, claim.lease_seconds, claim.max_claims
                )
                try:
                    events = lc.decide(command, states[stream], now)
                except InvalidTransition:
                    continue  # settled or re-claimed since nomination: move on
                pending.append((states[stream], events, None))
                states[stream] = _evolve_all(states[stream], events)
                if isinstance(events[-1], lc.Claimed):
                    claims.append((stream, delivery, claim_id))
        _, final = self._append(conn, _chain(pending), now, read_positions=False)
        if not claims:
            return outcomes, []
        published = _published_messages(
            r for s in {stream for stream, _, _ in claims} for r in streams[s]
        )
        out = []
        for stream, delivery, claim_id in claims:
            d = final[stream].delivery(delivery)
            out.append(
                ClaimedMessage(
                    delivery=delivery,
                    claim=claim_id,
                    stream=stream,
                    queue=d.queue,
                    message=published[delivery],
                    priority=d.priority,
                    lease_until=d.lease_until or now,
                    redelivered=d.redelivered,
                )
            )
        return outcomes, out

    def ack(self, refs: Sequence[ClaimRef]) -> dict[str, Outcome]:
        """Record that the claims' holders finished; stale claims write nothing."""
        return self._settle(refs, lambda r: lc.Ack(r.delivery, r.claim))

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

    # -- queues --------------------------------------------------------------

    def queue_size(self, queue: str) -> int:
        """Messages waiting in ``queue`` (ready or scheduled, not claimed)."""
        msgs = self.tables.messages
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        msgs.c.queue == queue, msgs.c.claim_id.is_(None)
                    )
                ).scalar_one()
            )

    def queue_stats(self) -> list[QueueStats]:
        """Ready, scheduled, claimed and dead counts per queue, and the oldest ages."""
        msgs, dead, ev = self.tables.messages, self.tables.dead_letters, self.tables.events
        stats: dict[str, dict[str, Any]] = defaultdict(dict)
        with self._read() as conn:
            now = self.now()
            state = sa.case(
                (msgs.c.claim_id.is_not(None), "claimed"),
                (msgs.c.available_at > now, "scheduled"),
                else_="ready",
            )
            # Claimable since it was published, or since its ETA if that came later.
            waiting_since = sa.case(
                (msgs.c.available_at > ev.c.recorded_at, msgs.c.available_at),
                else_=ev.c.recorded_at,
            )
            for queue, kind, count, oldest, since, claimed_at in conn.execute(
                sa.select(
                    msgs.c.queue, state, sa.func.count(), sa.func.min(msgs.c.seq),
                    sa.func.min(waiting_since), sa.func.min(msgs.c.claimed_at),
                )
                .join(ev, ev.c.position == msgs.c.seq)
                .group_by(msgs.c.queue, state)
            ):
                stats[queue][kind] = count
                old = stats[queue].get("oldest_seq")
                stats[queue]["oldest_seq"] = oldest if old is None else min(old, oldest)
                if kind == "ready":
                    stats[queue]["oldest_ready_age"] = max(0.0, now - since)
                elif kind == "claimed":
                    stats[queue]["oldest_lease_age"] = max(0.0, now - claimed_at)
            for queue, count in conn.execute(
                sa.select(dead.c.queue, sa.func.count()).group_by(dead.c.queue)
            ):
                stats[queue]["dead"] = count
        return [QueueStats(queue=q, **v) for q, v in sorted(stats.items())]

    def purge(self, queue: str, *, reason: str = "purged") -> int:
        """Discard every unclaimed message in ``queue``; returns how many."""
        msgs = self.tables.messages
        total = 0
        while True:

            def attempt() -> int:
                with self._write() as conn:
                    rows = conn.execute(
                        self.dialect.nominate(
                            sa.select(msgs.c.delivery_id, msgs.c.stream_id)
                            .where(msgs.c.queue == queue, msgs.c.claim_id.is_(None))
                            .limit(500),
                            msgs,
                        )
                    ).all()
                    states = self._load(conn, (r.stream_id for r in rows))
                    now = self.now()
                    pending = []
                    for delivery, stream in rows:
                        events = lc.decide(lc.Discard(delivery, reason), states[stream], now)
                        pending.append((states[stream], events, None))
                        states[stream] = _evolve_all(states[stream], events)
                    self._append(conn, _chain(pending), now)
                    return len(rows)

            done = self._retrying(attempt)
            total += done
            if done == 0:
                return total

    def dead_letters(self, queue: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        """Dead-lettered deliveries not published again, oldest first."""
        dl = self.tables.dead_letters
        query = sa.select(dl).order_by(dl.c.position).limit(limit)
        if queue is not None:
            query = query.where(dl.c.queue == queue)
        with self._read() as conn:
            return [
                DeadLetter(r.delivery_id, r.stream_id, r.queue, r.reason, r.dead_at)
                for r in conn.execute(query)
            ]

    def retry_dead(self, delivery: str) -> str:
        """Publish a dead-lettered delivery again, as a new delivery on its stream."""
        dl = self.tables.dead_letters
        with self._read() as conn:
            stream = conn.execute(
                sa.select(dl.c.stream_id).where(dl.c.delivery_id == delivery)
            ).scalar()
        if stream is None:
            raise InvalidTransition(f"no dead letter {delivery!r}")
        published = next(
            rec for rec in self.read_stream(stream)
            if isinstance(rec.event, lc.Published) and rec.event.delivery == delivery
        )
        original = published.event
        assert isinstance(original, lc.Published)
        new_delivery = uuid.uuid4().hex
        # Due now, but still bound by the task's own expiry (Celery's worker would
        # refuse an expired message anyway).  The history keeps what the first
        # publish said (task name, parent...), plus where this one comes from.
        self.execute(stream, lc.Publish(
            delivery=new_delivery,
            queue=original.queue,
            message=original.message,
            priority=original.priority,
            expires=original.expires,
            retry_of=delivery,
        ), metadata={**(published.metadata or {}), "retry_of": delivery})
        return new_delivery

    def purge_dead(self, queue: str | None = None) -> int:
        """Remove dead letters from the list (their history stays in the log)."""
        purged = 0
        for letter in self.dead_letters(queue):
            self.execute(letter.stream, lc.PurgeDeadLetter(letter.delivery))
            purged += 1
        return purged

    def revoke(self, stream: str, reason: str = "revoked") -> list[RecordedEvent]:
        """Durably revoke a task: its pending deliveries are discarded, future ones too."""
        return self.execute(stream, lc.Revoke(reason))

    # -- results -------------------------------------------------------------

    def results(self, streams: Iterable[str]) -> dict[str, tuple[str, Any, float | None]]:
        """``stream -> (state, encoded result, date_done)`` for streams with a result."""
        wanted = sorted(set(streams))
        if not wanted:
            return {}
        table = self.tables.results
        with self._read() as conn:
            rows = conn.execute(
                sa.select(table.c.stream_id, table.c.state, table.c.result, table.c.date_done)
                .where(table.c.stream_id.in_(wanted))
            )
            return {r.stream_id: (r.state, r.result, r.date_done) for r in rows}

    def prune(
        self, before: float, *, batch: int = 500, progress: Progress | None = None
    ) -> int:
        """Delete whole streams whose last event is older than ``before``; returns how many.

        A stream with a message still pending (ready, scheduled or claimed) or a
        dead letter nobody retried or purged is kept.
        Each batch deletes events and derived rows in one short transaction, so
        workers are never held up for long.  ``progress(done, total)`` is called
        after each batch with the streams examined so far out of those with an
        event older than ``before`` (counted first, only when it is given).
        """
        ev, msgs, dl = self.tables.events, self.tables.messages, self.tables.dead_letters
        pruned = examined = total = 0
        if progress is not None:
            with self._read() as conn:
                total = int(conn.execute(
                    sa.select(sa.func.count(ev.c.stream_id.distinct()))
                    .where(ev.c.recorded_at < before)
                ).scalar_one())
        after = ""
        while True:
            with self._write() as conn:
                candidates = list(
                    conn.execute(
                        sa.select(ev.c.stream_id)
                        .where(ev.c.recorded_at < before, ev.c.stream_id > after)
                        .group_by(ev.c.stream_id)
                        .order_by(ev.c.stream_id)
                        .limit(batch)
                    ).scalars()
                )
                if not candidates:
                    return pruned
                after = candidates[-1]
                recent = set(
                    conn.execute(
                        sa.select(ev.c.stream_id)
                        .where(ev.c.stream_id.in_(candidates), ev.c.recorded_at >= before)
                        .distinct()
                    ).scalars()
                )
                # Pending messages and unhandled dead letters keep their stream.
                pending = set(
                    conn.execute(
                        sa.select(msgs.c.stream_id).where(msgs.c.stream_id.in_(candidates))
                    ).scalars()
                ) | set(
                    conn.execute(
                        sa.select(dl.c.stream_id).where(dl.c.stream_id.in_(candidates))
                    ).scalars()
                )
                doomed = [s for s in candidates if s not in recent and s not in pending]
                if doomed:
                    conn.execute(ev.delete().where(ev.c.stream_id.in_(doomed)))
                    for table in self.tables.projections:
                        conn.execute(table.delete().where(table.c.stream_id.in_(doomed)))
                    pruned += len(doomed)
            if progress is not None:
                examined += len(candidates)
                progress(examined, max(total, examined))

    # -- projections ---------------------------------------------------------

    def rebuild(self, *, batch_streams: int = 1000, progress: Progress | None = None) -> int:
        """Empty every derived table and replay the log into it; returns events replayed.

        Writers wait for the rebuild (it holds the log against appends), readers do not.
        ``progress(done, total)`` is called with the events replayed so far.
        """
        ev = self.tables.events
        replayed = total = 0
        with self._write() as conn:
            self.dialect.lock_log(conn, ev)
            if progress is not None:
                total = int(conn.execute(sa.select(sa.func.count()).select_from(ev)).scalar_one())
            for table in self.tables.projections:
                table.create(conn, checkfirst=True)  # it may have been dropped
                conn.execute(table.delete())
            rows = conn.execute(
                sa.select(ev)
                .order_by(ev.c.stream_id, ev.c.version)
                .execution_options(yield_per=5000)
            )
            batch: list[RecordedEvent] = []
            states: dict[str, lc.JobState] = {}
            for row in rows:
                rec = self._recorded(row)
                if rec.stream not in states:
                    if len(states) >= batch_streams:
                        project(conn, self.tables, self.dialect, batch, states)
                        batch, states = [], {}
                        if progress is not None:
                            progress(replayed, total)
                    states[rec.stream] = lc.JobState(stream=rec.stream)
                state = states[rec.stream]
                if rec.version != state.version + 1:
                    raise CorruptStream(f"stream {rec.stream!r} skips to version {rec.version}")
                states[rec.stream] = lc.evolve(state, rec.event)
                batch.append(rec)
                replayed += 1
            project(conn, self.tables, self.dialect, batch, states)
            if progress is not None:
                progress(replayed, total)
        return replayed

    def projection_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every derived table, sorted: for comparing a rebuild."""
        out = {}
        with self._read() as conn:
            for table in self.tables.projections:
                key = list(table.primary_key.columns)
                out[table.name] = [tuple(r) for r in conn.execute(sa.select(table).order_by(*key))]
        return out


# -- helpers ---------------------------------------------------------------

#: Decisions made but not appended yet, and the stream states they lead to.
_Pending = list[tuple[lc.JobState, Sequence[lc.Event], Mapping[str, Any] | None]]


class _Statements:
    """The hot path's statements, built once: constructing one costs more Python
    than executing its cached compiled form."""

    def __init__(self, tables: Tables, dialect: Dialect) -> None:
        ev, msgs = tables.events, tables.messages
        self.read_streams = (
            sa.select(ev)
            .where(ev.c.stream_id.in_(sa.bindparam("streams", expanding=True)))
            .order_by(ev.c.stream_id, ev.c.version)
        )
        # Ready or lease-expired messages of the queues, highest priority, then oldest.
        self.nominate = dialect.nominate(
            sa.select(msgs.c.delivery_id, msgs.c.stream_id)
            .where(
                msgs.c.queue.in_(sa.bindparam("queues", expanding=True)),
                msgs.c.available_at <= sa.bindparam("now", type_=msgs.c.available_at.type),
            )
            .order_by(msgs.c.priority.desc(), msgs.c.seq)
            .limit(sa.bindparam("limit", type_=sa.Integer)),
            msgs,
        )


@dataclass(frozen=True)
class _ClaimRequest:
    queues: list[str]
    limit: int
    consumer: str
    lease_seconds: float
    max_claims: int | None

#: Events whose projection records their log position.
_POSITIONED = (lc.Published, lc.DeadLettered)

#: Events a result waiter may be waiting for.
_FINISHING = (
    lc.Succeeded, lc.Failed, lc.Revoked, lc.Discarded, lc.DeadLettered, lc.GroupSaved
)



def _fold(stream: str, recorded: Sequence[RecordedEvent]) -> lc.JobState:
    for expected, rec in enumerate(recorded, start=1):
        if rec.version != expected:
            raise CorruptStream(f"stream {stream!r} skips from {expected - 1} to {rec.version}")
    return lc.fold(stream, (rec.event for rec in recorded))


def _evolve_all(state: lc.JobState, events: Iterable[lc.Event]) -> lc.JobState:
    for event in events:
        state = lc.evolve(state, event)
    return state


def _chain(
    pending: Sequence[tuple[lc.JobState, Sequence[lc.Event], Mapping[str, Any] | None]],
) -> list[tuple[lc.JobState, Sequence[lc.Event], Mapping[str, Any] | None]]:
    """Drop empty decisions; the states already chain within a stream."""
    return [p for p in pending if p[1]]


def _published_messages(recorded: Iterable[RecordedEvent]) -> dict[str, Mapping[str, Any]]:
    return {
        rec.event.delivery: rec.event.message
        for rec in recorded
        if isinstance(rec.event, lc.Published)
    }


def _newly_ready(
    recorded: Iterable[RecordedEvent], states: Mapping[str, lc.JobState], now: float
) -> set[str]:
    """Queues that got a message claimable right now (worth waking consumers for)."""
    ready: set[str] = set()
    for rec in recorded:
        ev = rec.event
        if isinstance(ev, (lc.Published, lc.Requeued)):
            delivery = states[rec.stream].delivery(ev.delivery)
            if not delivery.status.is_final and (ev.not_before is None or ev.not_before <= now):
                ready.add(delivery.queue)
    return ready


class _SilentListener(Listener):
    def poll(self) -> set[str]:
        return set()

    def wait(self, timeout: float) -> set[str]:
        time.sleep(max(timeout, 0.0))
        return set()


def _first_line(exc: BaseException | None) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else type(exc).__name__
