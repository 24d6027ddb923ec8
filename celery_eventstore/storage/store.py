"""The event store: one face over the storage package's capabilities.

An :class:`EventStore` is built from small objects, each owning one concern:

* :class:`~.database.Database` -- the engine, transactions, durability, retries,
  the clock, and the translation of every driver error;
* :class:`~.queries.Queries` -- every statement, named and built once;
* :class:`~.log.EventLog` -- reading streams and positions, appending decisions
  with their projections and wake-ups, commands on one stream;
* :class:`~.deliveries.Deliveries` -- publish, claim, ack, reject, restore, renew;
* :class:`~.operations.Operations` -- queue statistics, dead letters, results,
  purge, prune and rebuild;
* :class:`~.routing.Routing` -- queue declarations, bindings, transient messages;
* :class:`~.task_index.TaskIndex` -- finding tasks by name, state, queue, worker,
  links and time;
* a :class:`~.notifiers.Notifier` -- the wake-up seam (NOTIFY, SQLite change
  detection, or polling), chosen apart from the dialect.

The face keeps the operations adapters call in one place; each method hands the
call to the capability that owns it.  Schema versions are checked here and
applied by the migration runner.  Names enter the store here, so they are checked
here, before any SQL is sent (:mod:`.names`): a command refuses a name that cannot
be stored with :class:`~celery_eventstore.exceptions.InvalidName`; a query answers
that nothing has it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .. import lifecycle as lc
from ..exceptions import (
    ConfigurationError,
    DatabaseError,
    InvalidURL,
    SchemaMissing,
    SchemaOutdated,
    SchemaTooNew,
    UnreadableStream,
)
from .borrowed import ConnectionInfo
from .database import Database, parse_url, redact
from .deliveries import DEFAULT_MAX_MESSAGE_SIZE, CheckedMessage, Deliveries
from .log import EventLog, fold
from .migrations import Migrator
from .names import Names, check_namespace
from .notifiers import POLL, Channels, Listener, default_notifier, notifier_for
from .operations import Operations, Progress
from .partitions import Partitions
from .queries import Queries
from .records import (
    ClaimedMessage,
    ClaimRef,
    ClaimRound,
    DeadLetter,
    LogFilter,
    NewMessage,
    Outcome,
    QueueStats,
    RecordedEvent,
    ScheduledMessage,
    TaskFilter,
    TaskSummary,
)
from .routing import Binding, QueueInfo, Routing
from .schema import SCHEMA_VERSION, Tables, make_tables
from .seeding import seed_settled
from .task_index import TaskIndex

#: The tables' prefix unless one is given.
DEFAULT_TABLE_PREFIX = "eventstore_"

#: How often a worker makes the partitions of the coming days (partitioned logs).
MAINTAIN_INTERVAL = 12 * 3600.0
#: How long after a failed attempt it tries again.
MAINTAIN_RETRY = 300.0

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "EventStore", "Progress", "parse_url", "redact"]


class EventStore:
    """An event store on one database.

    :param url: a SQLAlchemy URL (``postgresql://...``, ``sqlite:///jobs.db``); an
        ``eventstore+`` broker URL is accepted too.
    :param table_prefix: prefix of every table, so applications can share a database.
    :param schema: PostgreSQL schema holding the tables (default: the search path).
        Both may hold ASCII letters, digits and underscores, not starting with a
        digit; ``table_prefix`` at most 38 characters, so every derived name fits
        PostgreSQL's 63 bytes (else
        :class:`~celery_eventstore.exceptions.ConfigurationError`).
    :param clock: a function returning epoch seconds; by default the database's
        clock on PostgreSQL (so leases mean the same on every host), the host's on
        SQLite.  Tests inject one to move time without sleeping.
    :param auto_migrate: create or upgrade the schema on first use instead of
        failing with :class:`SchemaMissing`.
    :param notify: wake consumers and result waiters when work commits.  Off, they
        rely on their periodic poll (PgBouncer's transaction pooling).
    :param wakeup: the wake-up mechanism by name (``"notify"`` on PostgreSQL,
        ``"data_version"`` on SQLite, ``"poll"`` anywhere); default: the best the
        database offers, or ``"poll"`` with ``notify`` off.
    :param listen_url: where the process's LISTEN connection goes (PostgreSQL), when
        ``url`` goes through a pooler that cannot keep a LISTEN (PgBouncer in
        transaction pooling): a URL straight to the same database.  Default: ``url``.
    :param max_message_size: the largest message accepted by publish, in bytes of JSON.
    :param async_commit: commit claims, acks, lease renewals and STARTED states
        without waiting for the disk (PostgreSQL ``synchronous_commit=off``).  Only a
        crash of the database server can lose them, and losing one means a
        redelivery, which at-least-once delivery allows.  Publishes and results are
        always durable.
    :param partitioned_log: create the log partitioned by day (PostgreSQL only), so
        ``prune`` drops whole days instead of deleting rows.  It applies when the
        schema is created; a log created without it stays as it is
        (:class:`~celery_eventstore.exceptions.ConfigurationError`).  A store
        finds out by itself that a log is partitioned: only the process that
        creates the schema needs the option.
    """

    def __init__(
        self,
        url: str | sa.URL,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        schema: str | None = None,
        clock: Callable[[], float] | None = None,
        auto_migrate: bool = False,
        notify: bool = True,
        wakeup: str | None = None,
        listen_url: str | sa.URL | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        async_commit: bool = True,
        engine_options: Mapping[str, Any] | None = None,
        partitioned_log: bool = False,
    ) -> None:
        check_namespace(table_prefix, schema)
        self.db = Database(
            parse_url(url),
            clock=clock,
            async_commit=async_commit,
            engine_options=engine_options,
            prepare=self._ensure_schema,
        )
        self.url = self.db.url
        self.engine = self.db.engine
        self.table_prefix = table_prefix
        self.schema = schema
        self.auto_migrate = auto_migrate
        self.tables: Tables = make_tables(table_prefix, schema)
        self.names = Names(self.tables)
        if partitioned_log and not self.db.dialect.can_partition:
            raise ConfigurationError(
                f"partitioned_log needs PostgreSQL; {self.db.dialect.name} keeps one log table"
            )
        self.partitioned_log = partitioned_log
        self._migrator = Migrator(
            self.db.dialect, table_prefix, schema, partitioned=partitioned_log
        )
        self._maintained_at: float | None = None
        self._schema_ready = False
        backend = self.db.dialect.name
        self.notifier = notifier_for(
            wakeup or (default_notifier(backend) if notify else POLL), backend
        )
        self.channels = Channels(table_prefix, schema)
        self._listen_url = listen_url
        self._listen_engine: sa.Engine | None = None
        self.queries = Queries(self.tables, self.db.dialect)
        self.log = EventLog(self.db, self.queries, self.notifier, self.channels)
        self.deliveries = Deliveries(self.db, self.log, max_message_size)
        self.operations = Operations(self.db, self.log)
        self.routing = Routing(self.db, self.queries, self.notifier, self.channels.ready)
        self.task_index = TaskIndex(self.db, self.queries)
        self.partitions = Partitions(self.db, self.log)

    def __repr__(self) -> str:
        return f"<EventStore {redact(self.url)} prefix={self.table_prefix!r}>"

    @functools.cached_property
    def identity(self) -> str:
        """Which event log this store writes: the database (its URL, with no
        driver nor password) and the tables' namespace.  Two stores with one
        identity append to the same streams; the same database spelt another
        way merely looks like another (a claim's state then goes unused)."""
        where = self.url.set(drivername=self.db.dialect.name, password=None)
        return f"{where.render_as_string()}|{self.schema or ''}|{self.table_prefix}"

    @property
    def dialect_name(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        return self.db.dialect.name

    def driver(self) -> str:
        """The DB-API driver the store talks through, its version, and what a URL
        without a driver resolves to (``postgresql://`` is psycopg2 here)."""
        return self.db.describe_driver()

    def statement_preparing(self) -> str | None:
        """Whether and when the store's statements are prepared on the server, once
        a connection has been made (a pooler turns it off); None on SQLite."""
        return self.db.dialect.describe_preparing()

    @property
    def single_writer(self) -> bool:
        """One writer at a time for the whole database (SQLite): a caller must not keep
        a transaction open while other connections of its process write."""
        return self.db.dialect.single_writer

    def same_database(self, url: str | sa.URL) -> bool:
        """Whether ``url`` (a SQLAlchemy or ``eventstore+`` URL) names this store's
        database; False for anything that is not such a URL."""
        try:
            other = parse_url(url)
        except InvalidURL:
            return False
        if other.get_backend_name() != self.url.get_backend_name():
            return False
        return self.db.dialect.same_database(other, self.url)

    @property
    def max_message_size(self) -> int:
        return self.deliveries.max_message_size

    # -- connections and transactions -----------------------------------------

    def close(self) -> None:
        self.log.close()  # before the engine goes: it sends what it still owes
        self.db.close()
        if self._listen_engine is not None:
            self._listen_engine.dispose()

    def after_fork(self) -> None:
        """Drop pooled connections inherited from a parent process without closing them."""
        self.db.after_fork()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A write transaction of the store's own, for several operations that
        must commit together (pass it as ``connection=``)."""
        with self.db.write() as tx:
            yield tx.conn

    @contextlib.contextmanager
    def borrow(self, dbapi_connection: Any, info: ConnectionInfo) -> Iterator[sa.Connection]:
        """A ``Connection`` over a caller's DB-API connection (described by
        :func:`~.dialects.describe_connection` as ``info``) to pass as ``connection=``:
        the store's statements join the caller's transaction, and the store never
        begins, commits, rolls back or reconfigures it."""
        with self.db.borrow(dbapi_connection, info.url) as conn:
            yield conn

    @contextlib.contextmanager
    def _write(
        self, connection: sa.Connection | None = None, *, durable: bool = True
    ) -> Iterator[sa.Connection]:
        """A raw write transaction, begun as one that writes without reading
        first (tests read its session settings)."""
        with self.db.write(connection, durable=durable) as tx:
            tx.now  # noqa: B018 - reads the clock, relaxing the commit if asked
            yield tx.conn

    def listener(self, *, results: Iterable[str] | None = None) -> Listener:
        """A new :class:`~.notifiers.Listener` for "messages may be ready" wake-ups
        (the payloads are queue names), or, given the ``results`` streams to wait
        for, for "a result of one of them was recorded" (the payloads are stream
        ids).  On PostgreSQL it is a subscription to the process's one LISTEN
        connection; close it when done waiting."""
        self._ensure_schema()
        if results is None:
            channels = [self.channels.ready]
        else:
            channels = sorted({self.channels.result(s) for s in results})
        with self.db.translate_errors():
            return self.notifier.listen(self.listen_engine, channels)

    @property
    def listen_engine(self) -> sa.Engine:
        """The engine LISTEN connections are made with (``listen_url``'s, or the store's)."""
        if self._listen_url is None:
            return self.engine
        if self._listen_engine is None:
            self._listen_engine = self.db.side_engine(parse_url(self._listen_url))
        return self._listen_engine

    def watch(self, watcher: Callable[[list[RecordedEvent]], None]) -> None:
        """Call ``watcher`` with the events of each of the store's own write
        transactions once it has committed (not of those joined to a caller's
        connection: their commit is the caller's).  Its errors are logged."""
        if watcher not in self.db.committed:
            self.db.committed.append(watcher)

    def now(self) -> float:
        """Epoch seconds by the store's clock (the database's on PostgreSQL)."""
        return self.db.now()

    def clock_skew(self) -> float:
        """Database clock minus this host's clock, in seconds (0 on SQLite)."""
        return self.db.clock_skew()

    # -- schema --------------------------------------------------------------

    def schema_version(self) -> int:
        """The migration level of the database (0 when the tables do not exist)."""
        # Read-only on purpose: on SQLite it must not wait for a write lock that
        # an application's open transaction (an atomic enqueue) may be holding.
        with (
            self.db.translate_errors(), self.engine.connect() as conn,
            self.db.dialect.reading(conn),
        ):
            return self._migrator.current(conn)

    def migrate(self, to_version: int = SCHEMA_VERSION) -> list[int]:
        """Create or upgrade the schema (up to ``to_version``); returns the versions applied."""
        with self.db.translate_errors(), self.engine.begin() as conn:
            applied = self._migrator.apply(conn, to_version)
        self._schema_ready = to_version == SCHEMA_VERSION
        if self._schema_ready:
            self._find_layout()
        return applied

    def migration_sql(self, from_version: int = 0) -> str:
        """The SQL :meth:`migrate` would run from ``from_version``, for a DBA to review."""
        return self._migrator.script(self.engine.dialect, from_version)

    def migrate_command(self) -> str:
        """The command line that migrates this store's schema (its options before
        the sub-command, where the CLI takes them).  The URL stays a placeholder:
        it may hold a password."""
        options = ["--url URL"]
        if self.table_prefix != DEFAULT_TABLE_PREFIX:
            options.append(f"--table-prefix {self.table_prefix}")
        if self.schema:
            options.append(f"--schema {self.schema}")
        return f"celery-eventstore {' '.join(options)} migrate"

    def check_schema(self) -> None:
        """Raise unless the schema is exactly the version this code expects."""
        version = self.schema_version()
        if version == 0:
            raise SchemaMissing(
                f"the event store's tables do not exist in this database: run "
                f"`{self.migrate_command()}` (or enable auto_migrate)"
            )
        if version < SCHEMA_VERSION:
            raise SchemaOutdated(
                f"the event store's schema is at version {version}, this code needs "
                f"{SCHEMA_VERSION}: run `{self.migrate_command()}`"
            )
        if version > SCHEMA_VERSION:
            raise SchemaTooNew()

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        # Look first (a read), migrate only when behind: an up-to-date schema then
        # costs no write lock, which matters inside an application's transaction,
        # and needs no right beyond reading (an application role without DDL).
        if self.auto_migrate and (version := self.schema_version()) < SCHEMA_VERSION:
            try:
                self.migrate()
            except DatabaseError as exc:  # e.g. a role that may not create tables
                behind = SchemaMissing if version == 0 else SchemaOutdated
                raise behind(
                    f"the event store's schema is at version {version}, this code needs "
                    f"{SCHEMA_VERSION}, and auto_migrate could not migrate it ({exc}): run "
                    f"`{self.migrate_command()}` as a role that may change the "
                    "schema (see 'Database roles' in the operations docs)"
                ) from exc
        self.check_schema()
        self._find_layout()
        self._schema_ready = True

    def _find_layout(self) -> None:
        """Whether the log is partitioned: writers hold their streams then."""
        with self.db.translate_errors(), self.engine.connect() as conn:
            partitioned = self.db.dialect.partitioned(conn, self.tables.events)
        if self.partitioned_log and not partitioned:
            raise ConfigurationError(
                "partitioned_log is set but this database's log was created unpartitioned: "
                "the option applies only when the schema is created (see 'Partitioned log' "
                "in the operations docs)"
            )
        self.log.partitioned = partitioned

    @property
    def partitioned(self) -> bool:
        """Whether the log is partitioned by day (created with ``partitioned_log``)."""
        self._ensure_schema()
        return self.log.partitioned

    # -- the log ------------------------------------------------------------------

    def read_stream(self, stream: str) -> list[RecordedEvent]:
        """Every event of one stream, oldest first."""
        if not self.names.stream.fits(stream):
            return []
        return self.log.read_stream(stream)

    def load(self, stream: str) -> lc.JobState:
        """One stream folded into its current state."""
        if not self.names.stream.fits(stream):
            return fold(stream, ())
        return self.log.load(stream)

    def task_names(self, streams: Iterable[str]) -> dict[str, str]:
        """``stream -> task name`` as the first publish of each stream recorded it."""
        return self.log.task_names(self.names.stream.storable(streams))

    def read_all(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Events of every stream with a position above ``after``, in log order."""
        return self.log.read_all(after, limit)

    def read_positions(self, positions: Iterable[int]) -> list[RecordedEvent]:
        """The events at these log positions that exist (are committed) now."""
        return self.log.read_positions(positions)

    def last_position(self) -> int:
        """The log's highest position (0 when it is empty)."""
        return self.log.last_position()

    def read_log(
        self, where: LogFilter | None = None, *, after: int = 0, before: int | None = None,
        limit: int = 1000, newest_first: bool = False,
    ) -> list[RecordedEvent]:
        """Events matching ``where`` between positions ``after`` and ``before``
        (both exclusive), oldest first, or newest first: ``tail`` reads the end of
        the log this way without reading the rest."""
        where = where or LogFilter()
        if not all(self.names.stream.fits(v) for v in (where.queue, where.name) if v):
            return []  # a name no column can hold: nothing has it
        return self.log.read_log(
            where, after=after, before=before, limit=limit, newest_first=newest_first
        )

    # -- the task index -------------------------------------------------------------

    def tasks(self, where: TaskFilter | None = None, *, limit: int = 50) -> list[TaskSummary]:
        """Tasks matching ``where``, newest first (ties by task id, descending), at
        most ``limit``: answered from the task index, not the log."""
        where = where or TaskFilter()
        if not all(self.names.stream.fits(v) for v in where.given().values()
                   if isinstance(v, str)):
            return []  # a name no column can hold: nothing has it
        return self.task_index.tasks(where, limit)

    def task_summaries(self, task_ids: Iterable[str]) -> dict[str, TaskSummary]:
        """The task index's rows for those task ids that have one."""
        return self.task_index.summaries(self.names.stream.storable(task_ids))

    def append(
        self,
        stream: str,
        events: Sequence[lc.Event],
        expected_version: int,
        *,
        metadata: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
    ) -> list[RecordedEvent]:
        """Append ``events`` to ``stream`` if it is at ``expected_version``."""
        self.names.stream.check(stream)
        return self.log.append(
            stream, events, expected_version, metadata=metadata, connection=connection
        )

    def execute(
        self,
        stream: str,
        command: lc.Command,
        *,
        metadata: Mapping[str, Any] | None = None,
        connection: sa.Connection | None = None,
        known: lc.JobState | None = None,
    ) -> list[RecordedEvent]:
        """Decide ``command`` on the stream's current state and append the result.

        ``known``: the stream's state as a claim in this store left it
        (:attr:`ClaimedMessage.state`).  A worker's result write is then decided
        on it and appended without reading the stream, unless the stream moved
        on since (then it is read, as without it)."""
        self.names.stream.check(stream)
        return self.log.execute(
            stream, command, metadata=metadata, connection=connection, known=known
        )

    # -- deliveries --------------------------------------------------------------

    def publish(
        self, messages: Sequence[NewMessage], *, connection: sa.Connection | None = None
    ) -> list[str]:
        """Publish messages; returns their delivery ids (see :meth:`.Deliveries.publish`)."""
        return self.publish_checked(self.check_publish(messages), connection=connection)

    def check_publish(self, messages: Sequence[NewMessage]) -> list[CheckedMessage]:
        """What :meth:`publish` refuses (names, size), refused now, without I/O:
        a publish held for a later batch fails at the call, not at the write."""
        for msg in messages:
            self.names.stream.check(msg.stream)
            self.names.queue.check(msg.queue)
            if msg.delivery is not None:
                self.names.delivery.check(msg.delivery)
        return self.deliveries.check(messages)

    def publish_checked(
        self, messages: Sequence[CheckedMessage], *, connection: sa.Connection | None = None
    ) -> list[str]:
        """Publish messages :meth:`check_publish` accepted, as one batch."""
        return self.deliveries.publish(messages, connection=connection)

    def claim(
        self,
        queues: Sequence[str],
        limit: int,
        consumer: str,
        lease_seconds: float,
        *,
        max_claims: int | None = None,
    ) -> list[ClaimedMessage]:
        """Claim up to ``limit`` due messages (see :meth:`.Deliveries.claim`)."""
        self.names.queue.check(*queues)
        self.names.consumer.check(consumer)
        return self.deliveries.claim(
            queues, limit, consumer, lease_seconds, max_claims=max_claims
        )

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
        """Ack, then claim, in one transaction."""
        done = self.claim_round(acks, queues, limit, consumer, lease_seconds,
                                max_claims=max_claims)
        return done.outcomes, done.claimed

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
        """Ack, claim and (``next_due``) look up the next ETA, in one transaction
        (see :meth:`.Deliveries.claim_round`)."""
        self.names.queue.check(*queues)
        self.names.consumer.check(consumer)
        return self.deliveries.claim_round(
            acks, queues, limit, consumer, lease_seconds, max_claims=max_claims,
            next_due=next_due,
        )

    def earliest_due(self, queues: Sequence[str], after: float) -> float | None:
        """The next ETA after ``after`` in ``queues`` (see :meth:`.Deliveries.earliest_due`)."""
        self.names.queue.check(*queues)
        return self.deliveries.earliest_due(queues, after)

    def ack(self, refs: Sequence[ClaimRef]) -> dict[str, Outcome]:
        return self.deliveries.ack(refs)

    def reject(
        self, refs: Sequence[ClaimRef], *, requeue: bool, reason: str = "rejected"
    ) -> dict[str, Outcome]:
        return self.deliveries.reject(refs, requeue=requeue, reason=reason)

    def restore(self, refs: Sequence[ClaimRef]) -> dict[str, Outcome]:
        return self.deliveries.restore(refs)

    def renew(self, refs: Sequence[ClaimRef], lease_seconds: float) -> dict[str, Outcome]:
        return self.deliveries.renew(refs, lease_seconds)

    # -- operations ----------------------------------------------------------------

    def ping(self) -> None:
        """Check that the database answers and the schema is in place."""
        self.operations.ping()

    def maintenance_warnings(self) -> list[str]:
        return self.operations.maintenance_warnings()

    def queue_size(self, queue: str) -> int:
        if not self.names.queue.fits(queue):
            return 0
        return self.operations.queue_size(queue)

    def queue_stats(self) -> list[QueueStats]:
        return self.operations.queue_stats()

    def scheduled(self, queues: Iterable[str], limit: int = 1000) -> list[ScheduledMessage]:
        """Messages of ``queues`` held until their ETA, soonest first."""
        return self.operations.scheduled(self.names.queue.storable(queues), limit)

    def purge(self, queue: str, *, reason: str = "purged") -> int:
        self.names.queue.check(queue)
        return self.operations.purge(queue, reason=reason)

    def dead_letters(self, queue: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        if queue is not None and not self.names.queue.fits(queue):
            return []
        return self.operations.dead_letters(queue, limit)

    def retry_dead(self, delivery: str) -> str:
        self.names.delivery.check(delivery)
        return self.operations.retry_dead(delivery)

    def purge_dead(self, queue: str | None = None) -> int:
        if queue is not None:
            self.names.queue.check(queue)
        return self.operations.purge_dead(queue)

    def revoke(self, stream: str, reason: str = "revoked") -> list[RecordedEvent]:
        """Durably revoke a task: its pending deliveries are discarded, future ones too."""
        self.names.stream.check(stream)
        return self.log.execute(stream, lc.Revoke(reason))

    def results(self, streams: Iterable[str]) -> dict[str, tuple[str, Any, float | None]]:
        return self.operations.results(self.names.stream.storable(streams))

    def expire_results(self, before: float, *, batch: int = 500) -> int:
        """Expire the results recorded before ``before``; their history stays."""
        return self.operations.expire_results(before, batch=batch)
    def streams_linked(self, link: str, value: str) -> list[str]:
        return self.operations.streams_linked(link, value)

    def prune(
        self, before: float, *, batch: int = 500, progress: Progress | None = None,
        dry_run: bool = False,
    ) -> int:
        """Delete whole streams whose last event is older than ``before`` (see
        :meth:`Operations.prune`); returns how many.  On a partitioned log the days
        wholly before ``before`` go first, a partition at a time (their live streams
        moved to today's), then the rest in batches as on any log."""
        dropped = 0
        if self.partitioned and not dry_run:
            dropped = self.partitions.drop_before(before)
        return dropped + self.operations.prune(
            before, batch=batch, progress=progress, dry_run=dry_run
        )

    def maintain(self, days: int = 7) -> list[str]:
        """Make the missing partitions of today and the next ``days`` days
        (partitioned logs; nothing to do on others); returns their names."""
        if not self.partitioned:
            return []
        return self.partitions.create_ahead(days)

    def seed_settled(
        self,
        count: int,
        *,
        queue: str = "celery",
        message: Any = None,
        stream_prefix: str = "seed-",
        recorded_at: float | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Append ``count`` settled tasks (published, claimed, acked), streams
        ``<stream_prefix>1`` .. ``<stream_prefix><count>``, copied by the database:
        a long history in seconds, for benchmarks and tests."""
        return seed_settled(
            self.db, self.queries, count, queue=queue,
            message={"body": "seed"} if message is None else message,
            stream_prefix=stream_prefix,
            recorded_at=self.db.now() if recorded_at is None else recorded_at,
            progress=progress,
        )

    def rebuild(
        self,
        *,
        batch_streams: int = 1000,
        progress: Progress | None = None,
        on_unreadable: Callable[[UnreadableStream], None] | None = None,
    ) -> int:
        return self.operations.rebuild(
            batch_streams=batch_streams, progress=progress, on_unreadable=on_unreadable
        )

    def unreadable_streams(self) -> list[UnreadableStream]:
        """Streams holding an event that cannot be read (a scan of the whole log)."""
        return self.operations.unreadable_streams()

    def projection_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        return self.operations.projection_rows()

    # -- routing -------------------------------------------------------------------

    def declare_queue(self, info: QueueInfo, *, connection: sa.Connection | None = None) -> None:
        self.names.queue.check(info.name)
        self.routing.declare_queue(info, connection=connection)

    def queue_info(self, names: Iterable[str]) -> dict[str, QueueInfo]:
        return self.routing.queue_info(self.names.queue.storable(names))

    def queue_exists(self, name: str) -> bool:
        return self.names.queue.fits(name) and self.routing.queue_exists(name)

    def touch_queues(self, names: Sequence[str]) -> None:
        self.routing.touch_queues(self.names.queue.storable(names))

    def bind(self, binding: Binding, *, connection: sa.Connection | None = None) -> None:
        self._check_binding(binding.exchange, binding.queue, binding.routing_key)
        if binding.pattern is not None:
            self.names.pattern.check(binding.pattern)
        self.names.exchange_type.check(binding.exchange_type)
        self.routing.bind(binding, connection=connection)

    def unbind(self, exchange: str, queue: str, routing_key: str) -> None:
        self._check_binding(exchange, queue, routing_key)
        self.routing.unbind(exchange, queue, routing_key)

    def _check_binding(self, exchange: str, queue: str, routing_key: str) -> None:
        self.names.exchange.check(exchange)
        self.names.queue.check(queue)
        self.names.routing_key.check(routing_key)

    def bindings(self, exchange: str) -> list[Binding]:
        if not self.names.exchange.fits(exchange):
            return []
        return self.routing.bindings(exchange)

    def put_transient(
        self, messages: Sequence[tuple[str, Mapping[str, Any], int, float | None]]
    ) -> None:
        self.names.queue.check(*(queue for queue, _, _, _ in messages))
        self.routing.put_transient(messages)

    def take_transient(self, queues: Sequence[str], limit: int) -> list[tuple[str, dict[str, Any]]]:
        return self.routing.take_transient(self.names.queue.storable(queues), limit)

    def transient_size(self, queue: str) -> int:
        if not self.names.queue.fits(queue):
            return 0
        return self.routing.transient_size(queue)

    def purge_transient(self, queue: str) -> int:
        self.names.queue.check(queue)
        return self.routing.purge_transient(queue)

    def forget_queue(self, queue: str) -> None:
        self.names.queue.check(queue)
        self.routing.forget_queue(queue)

    def sweep(self) -> int:
        swept = self.routing.sweep()
        self._maintain_when_due()
        return swept

    def _maintain_when_due(self) -> None:
        """Make the coming days' partitions on the first sweep and twice a day
        after (a partitioned log only): every worker does, the first one does it."""
        now = time.monotonic()
        if self._maintained_at is not None and now - self._maintained_at < MAINTAIN_INTERVAL:
            return
        self._maintained_at = now
        if not self.log.partitioned:
            return
        try:
            made = self.maintain()
        except DatabaseError as exc:
            logger.warning("could not make the log's next partitions (will retry): %s", exc)
            self._maintained_at = now - MAINTAIN_INTERVAL + MAINTAIN_RETRY
            return
        if made:
            logger.info("made the log's partitions %s", ", ".join(made))

