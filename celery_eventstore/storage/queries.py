"""Every statement the store sends, each with a name, built once per store.

Building a SQLAlchemy statement costs more Python than executing its cached
compiled form, so the store builds these when it is created and the hot path
only binds parameters.  Parameters are bound by name; the docstring of each
group says which.  What differs between databases (a claim's row locks, an
upsert) comes from the dialect, here and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .dialects import Dialect
from .schema import CANVAS_LINKS, Tables


def _many(name: str) -> sa.BindParameter[Any]:
    """A list parameter (``IN :name``)."""
    return sa.bindparam(name, expanding=True)


class Queries:
    """Named statements on one store's tables."""

    def __init__(self, tables: Tables, dialect: Dialect) -> None:
        self.tables = tables
        self.dialect = dialect
        self._log(tables, dialect)
        self._deliveries(tables, dialect)
        self._projections(tables, dialect)
        self._operations(tables)
        self._retention(tables)
        self._routing(tables, dialect)
        self._tasks(tables)

    # -- the log: streams, positions, appends ---------------------------------

    def _log(self, t: Tables, dialect: Dialect) -> None:
        ev = t.events
        # The JSON columns come back as the driver gives them, undecoded by
        # SQLAlchemy, so one unreadable row is found as such instead of failing
        # the whole result (EventLog.recorded decodes each row by itself).
        events = sa.select(
            ev.c.position, ev.c.stream_id, ev.c.version, ev.c.type,
            sa.type_coerce(ev.c.data, sa.Text).label("data"),
            sa.type_coerce(ev.c.metadata, sa.Text).label("metadata"),
            ev.c.recorded_at, ev.c.born,
        )
        self._events = events
        #: ``since``: the first position recorded then or later (None: none is).
        self.first_position_since = sa.select(sa.func.min(ev.c.position)).where(
            ev.c.recorded_at >= sa.bindparam("since", type_=ev.c.recorded_at.type)
        )
        #: ``until``: the last position recorded then or earlier (None: none is).
        self.last_position_until = sa.select(sa.func.max(ev.c.position)).where(
            ev.c.recorded_at <= sa.bindparam("until", type_=ev.c.recorded_at.type)
        )
        #: ``streams``: every event of those streams, in stream then version order.
        self.read_streams_whole = dialect.each_of(
            events, ev.c.stream_id, "streams", order_by=("stream_id", "version")
        )
        #: ``streams``: what folding those streams needs, in stream then version
        #: order: every event with its message body blanked (``null``) and without
        #: metadata.  A decision never reads a body; a publish's body is most of
        #: its bytes, and a claim takes the bodies it delivers from its nomination.
        #: ``known`` (a list, may be empty) and ``after``: of the streams in
        #: ``known`` (whose state the caller holds up to a version), only the
        #: events after version ``after`` -- their tails, if ``after`` is the
        #: lowest of the versions held.
        self.read_streams = dialect.each_of(
            sa.select(
                ev.c.position, ev.c.stream_id, ev.c.version, ev.c.type,
                sa.type_coerce(
                    dialect.blank_json_field(ev.c.data, "message", ev.c.type == "Published"),
                    sa.Text,
                ).label("data"),
                sa.null().label("metadata"),
                ev.c.recorded_at, ev.c.born,
                # ``relaxed`` (default false): the writing transaction's clock comes
                # with its first read (see Dialect.clock_columns).
                *dialect.clock_columns(
                    sa.bindparam("relaxed", value=False, type_=sa.Boolean)
                ),
            ).where(sa.or_(
                ev.c.version > sa.bindparam("after", value=0, type_=sa.Integer),
                sa.not_(dialect.one_of(ev.c.stream_id, "known")),
            )),
            ev.c.stream_id, "streams", order_by=("stream_id", "version"),
        )
        #: ``after``, ``limit``: events past a position, in log order.
        self.read_after = (
            events.where(ev.c.position > sa.bindparam("after"))
            .order_by(ev.c.position).limit(sa.bindparam("limit", type_=sa.Integer))
        )
        #: ``streams``: the publishes of those streams (their metadata names the
        #: task), in stream then version order.
        self.read_publishes = (
            events.where(ev.c.stream_id.in_(_many("streams")), ev.c.type == "Published")
            .order_by(ev.c.stream_id, ev.c.version)
        )
        #: ``positions``: the events at those positions that are committed.
        self.read_positions = (
            events.where(ev.c.position.in_(_many("positions"))).order_by(ev.c.position)
        )
        #: The highest position in the log (an index lookup), or None when empty.
        self.last_position = sa.select(sa.func.max(ev.c.position))
        #: The whole log, stream by stream (a rebuild, a check).
        self.every_stream = events.order_by(ev.c.stream_id, ev.c.version)
        self.count_events = sa.select(sa.func.count()).select_from(ev)
        #: ``link`` -> ``value``: streams published naming ``value`` as their
        #: ``link`` (``root_id``, ``group``), through that link's partial index.
        self.streams_linked = {}
        for key in CANVAS_LINKS:
            field = dialect.json_field(ev.c.metadata, key)
            self.streams_linked[key] = (
                sa.select(ev.c.stream_id)
                .where(field == sa.bindparam("value", type_=sa.Text), field != ev.c.stream_id)
                .distinct()
            )
        #: ``stream``: the stream's birth day (None: no event, or none recorded).
        self.stream_born = (
            sa.select(ev.c.born).where(ev.c.stream_id == sa.bindparam("stream"))
            .order_by(ev.c.version).limit(1)
        )
        self.append = ev.insert()
        self.append_returning = ev.insert().returning(
            ev.c.position, sort_by_parameter_order=True
        )

    @functools.cache  # noqa: B019 - one Queries per store, one per set of filters
    def log_page(self, filters: tuple[str, ...], newest_first: bool) -> sa.Select[Any]:
        """``after``, ``limit`` and each of ``filters`` (``before``, and the fields of
        a :class:`~.records.LogFilter`): events between two positions, oldest or
        newest first.  ``name`` and ``queue`` select streams by the task index."""
        ev, tasks = self.tables.events, self.tables.tasks
        time = ev.c.recorded_at.type
        where = [ev.c.position > sa.bindparam("after")]
        for name in filters:
            if name == "before":
                where.append(ev.c.position < sa.bindparam("before"))
            elif name == "types":
                where.append(ev.c.type.in_(_many("types")))
            elif name == "since":
                where.append(ev.c.recorded_at >= sa.bindparam("since", type_=time))
            elif name == "until":
                where.append(ev.c.recorded_at <= sa.bindparam("until", type_=time))
            else:  # name, queue: the task index's columns, looked up per event (by
                # its primary key) as the log is walked from one end: the set of all
                # a common name's streams is never built.
                where.append(
                    sa.select(tasks.c.stream_id)
                    .where(tasks.c.stream_id == ev.c.stream_id,
                           tasks.c[name] == sa.bindparam(name))
                    .exists()
                )
        order = ev.c.position.desc() if newest_first else ev.c.position
        return (
            self._events.where(*where).order_by(order)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )

    # -- deliveries: claims -----------------------------------------------------

    def _deliveries(self, t: Tables, dialect: Dialect) -> None:
        msgs = t.messages
        #: ``stream``: the stream's deliveries still in the queue (quarantine).
        self.pending_of_stream = sa.select(msgs.c.delivery_id, msgs.c.queue).where(
            msgs.c.stream_id == sa.bindparam("stream")
        )
        #: ``queue``: unclaimed deliveries to discard, a batch at a time (purge).
        self.nominate_unclaimed = dialect.nominate(
            sa.select(msgs.c.delivery_id, msgs.c.stream_id)
            .where(msgs.c.queue == sa.bindparam("queue"), msgs.c.claim_id.is_(None))
            .limit(500),
            msgs,
        )

    # -- projections: the derived tables ----------------------------------------

    def _projections(self, t: Tables, dialect: Dialect) -> None:
        msgs, dl, res = t.messages, t.dead_letters, t.results
        self.insert_messages = msgs.insert()
        #: ``deliveries``: settled deliveries leave the hot table.
        self.delete_messages = msgs.delete().where(dialect.one_of(msgs.c.delivery_id, "deliveries"))
        self.insert_dead_letters = dl.insert()
        #: ``deliveries``: dead letters published again or purged.
        self.delete_dead_letters = dl.delete().where(dl.c.delivery_id.in_(_many("deliveries")))
        #: ``stream_id``, ``state``, ``result``, ``date_done``.
        self.upsert_result = dialect.upsert(
            res, ("stream_id", "state", "result", "date_done"), keys=("stream_id",)
        )
        #: Every derived table emptied, in an order that respects their links (rebuild).
        self.empty_projections = [table.delete() for table in t.projections]
        #: ``streams``: results forgotten.
        self.delete_results = res.delete().where(res.c.stream_id.in_(_many("streams")))
        self._chords(t, dialect)

    def _chords(self, t: Tables, dialect: Dialect) -> None:
        ev, ch, cp = t.events, t.chords, t.chord_parts
        stream = sa.bindparam("stream", type_=ch.c.stream_id.type)

        def of_chord(column: sa.ColumnElement[Any], name: str) -> sa.Label[Any]:
            return sa.select(column).where(ch.c.stream_id == stream).scalar_subquery().label(name)

        #: ``stream``, ``task``: one chord's read model (``version``, ``counted``,
        #: ``completed``; NULL without a row), whether it counted that task
        #: (``known``), and the stream's last version in the log (``logged``):
        #: index lookups, whatever the chord's size.
        self.chord_snapshot = sa.select(
            sa.select(sa.func.max(ev.c.version)).where(ev.c.stream_id == stream)
            .scalar_subquery().label("logged"),
            sa.select(ev.c.born).where(ev.c.stream_id == stream).order_by(ev.c.version)
            .limit(1).scalar_subquery().label("born"),
            of_chord(ch.c.version, "version"),
            of_chord(ch.c.counted, "counted"),
            of_chord(ch.c.completed, "completed"),
            sa.exists().where(cp.c.stream_id == stream, cp.c.task_id == sa.bindparam("task"))
            .label("known"),
        )
        #: ``stream_id``, ``version``, ``counted``, ``completed``.
        self.upsert_chord = dialect.upsert(
            ch, ("stream_id", "version", "counted", "completed"), keys=("stream_id",)
        )
        #: ``stream_id``, ``task_id``: parts counted.
        self.insert_chord_parts = cp.insert()
        #: ``stream``: a chord's parts, before writing them anew.
        self.delete_chord_parts = cp.delete().where(cp.c.stream_id == stream)

    @functools.cache  # noqa: B019 - one Queries per store, a handful of queue counts
    def nominate(self, queues: int) -> sa.Select[Any]:
        """``queue_0`` .. ``queue_<queues - 1>``, ``now``, ``limit``, ``relaxed``,
        ``next_due``: due deliveries (``delivery_id``, ``stream_id``, and the ``data``
        of the publish that holds the body), highest priority, then oldest, locked
        against other claimers (:meth:`nominate_params` binds them).

        It always returns at least one row, and every row carries what the rest
        of a claim's round needs, so none costs a round trip of its own:
        ``tx_clock``, the time the claim decides at (``now``, or, where ``now`` is
        None, the database's clock, read once; see ``Dialect.clock_columns`` for
        ``relaxed``), and, where ``next_due`` is true, ``next_due``: the earliest
        ETA in the queues later than that time (as :meth:`earliest_due`), read in
        the same snapshot -- any earlier one is due, so nominated here or held by
        another claimer.  Without a due delivery the one row's ``delivery_id`` is
        NULL.  A delivery's row also carries its publish as an event (``position``,
        ``version``, ``type``, ``recorded_at``, ``born``) and its stream's
        ``last_version``, and every row carries what became of the streams the
        round settles from held states (see :meth:`_known_streams`): what a round
        needs to fold its streams without reading them.

        Each queue is read through two bounded index ranges, whatever the planner
        knows: the first ``limit`` claimable messages without an ETA in claim order
        (stepping over those in flight only), and the first ``limit`` scheduled
        messages that are due, in the order they fell due.  Messages scheduled for
        later are never read, however many there are.  Among more than ``limit``
        scheduled messages falling due at once, the earlier due go first.
        """
        msgs = self.tables.messages
        given = sa.bindparam("now", type_=msgs.c.available_at.type)
        database_clock = self.dialect.clock_expression()
        clock = sa.select(
            (given if database_clock is None else sa.func.coalesce(given, database_clock))
            .label("now"),
            *self.dialect.relaxed_columns(sa.bindparam("relaxed", type_=sa.Boolean)),
        ).cte("clock")
        # A volatile clock is evaluated once, in the CTE, whatever reads it.
        now = sa.select(clock.c.now).scalar_subquery()
        limit = sa.bindparam("limit", type_=sa.Integer)
        columns = (msgs.c.delivery_id, msgs.c.stream_id, msgs.c.priority, msgs.c.seq)
        arms = []
        for i in range(queues):
            queue = msgs.c.queue == sa.bindparam(f"queue_{i}", type_=msgs.c.queue.type)
            ready = (
                sa.select(*columns)
                .where(queue, msgs.c.not_before.is_(None), msgs.c.available_at <= now)
                .order_by(msgs.c.priority.desc(), msgs.c.seq)
                .limit(limit)
            )
            due = (
                sa.select(*columns)
                .where(
                    queue,
                    msgs.c.not_before.is_not(None),
                    msgs.c.not_before <= now,
                    msgs.c.available_at <= now,
                )
                .order_by(msgs.c.not_before)
                .limit(limit)
            )
            for arm in (ready, due):
                locked = self.dialect.nominate(arm, msgs).subquery()
                arms.append(sa.select(locked))
        candidates = sa.union_all(*arms).subquery()
        ev = self.tables.events
        later = ev.alias("later")
        # The publish the row was made by -- the body to deliver (folding the
        # streams reads them without bodies) and the publish as an event.
        publish_of: sa.FromClause = ev
        publish: list[sa.ColumnElement[Any]] = [
            sa.type_coerce(ev.c.data, sa.Text).label("data"),
            ev.c.version, ev.c.type, ev.c.recorded_at, ev.c.born,
        ]
        onclause: sa.ColumnElement[bool] = ev.c.position == candidates.c.seq
        if self.dialect.lateral_joins:
            # Looked up by its position for each candidate: as a join, a plan
            # made while the log was small (a prepared statement's generic plan)
            # would go on hashing the whole log.
            publish_of = (
                sa.select(*publish).where(onclause).limit(1).lateral("publish")
            )
            publish, onclause = list(publish_of.c), sa.true()
        picked = (
            sa.select(
                candidates.c.delivery_id, candidates.c.stream_id,
                candidates.c.priority, candidates.c.seq, *publish,
                # The stream's last version: a stream whose one event is that
                # publish needs no read to be folded.
                sa.select(sa.func.max(later.c.version))
                .where(later.c.stream_id == candidates.c.stream_id)
                .scalar_subquery().label("last_version"),
            )
            .join(publish_of, onclause)
            .order_by(candidates.c.priority.desc(), candidates.c.seq)
            .limit(limit)
            .subquery("picked")
        )
        # NULL when not asked for: ``not_before > NULL`` matches nothing.
        next_due = self._first_etas(
            queues, sa.case((sa.bindparam("next_due", type_=sa.Boolean), now))
        )
        return (
            sa.select(
                clock.c.now.label("tx_clock"),
                *[c for c in clock.c if c.name != "now"],
                next_due.scalar_subquery().label("next_due"),
                self._known_streams(),
                picked.c.delivery_id, picked.c.stream_id, picked.c.data,
                picked.c.seq.label("position"), picked.c.version, picked.c.type,
                picked.c.recorded_at, picked.c.born, picked.c.last_version,
            )
            .select_from(clock)
            .outerjoin(picked, sa.true())
            .order_by(picked.c.priority.desc(), picked.c.seq)
        )

    @property
    def tails_in_nomination(self) -> bool:
        """Whether :meth:`nominate` brings the tails of the ``known`` streams
        (``known_tails``), or only says whether they moved (``known_last``)."""
        return self._known_tails() is not None

    def _known_streams(self) -> sa.ColumnElement[Any]:
        """The nomination's column on the streams a round settles from held
        states: ``known_tails``, where the database aggregates rows as JSON --
        the events of the ``known`` streams after ``known_after`` (the lowest
        version held), as a decision reads them -- else ``known_last``, the
        sum of the last versions of the ``known`` streams: equal to the sum of
        the versions held, none has moved."""
        tails = self._known_tails()
        if tails is not None:
            return tails.label("known_tails")
        if self.dialect.prepares:
            # Either column keeps the server from the nomination's generic plan,
            # so that prepared, it would be planned on every run: read instead.
            return sa.null().label("known_last")
        ev = self.tables.events
        lasts = (
            sa.select(sa.func.max(ev.c.version).label("last"))
            .where(self.dialect.one_of(ev.c.stream_id, "known"))
            .group_by(ev.c.stream_id)
            .subquery()
        )
        return sa.select(sa.func.sum(lasts.c.last)).scalar_subquery().label("known_last")

    @functools.cache  # noqa: B019 - one Queries per store
    def _known_tails(self) -> sa.ColumnElement[Any] | None:
        if self.dialect.prepares:
            return None
        # The lowest version held for all the streams, as read_streams' ``after``:
        # the caller drops the events it holds already.
        ev = self.tables.events
        tail = ev.alias("tail")
        aggregate = self.dialect.json_rows(
            {
                "position": tail.c.position, "stream_id": tail.c.stream_id,
                "version": tail.c.version, "type": tail.c.type,
                "data": self.dialect.blank_json_field(
                    tail.c.data, "message", tail.c.type == "Published"
                ),
                "recorded_at": tail.c.recorded_at, "born": tail.c.born,
            },
            (tail.c.stream_id, tail.c.version),
        )
        if aggregate is None:
            return None
        return (
            sa.select(sa.type_coerce(aggregate, sa.Text))
            .where(
                self.dialect.one_of(tail.c.stream_id, "known"),
                tail.c.version > sa.bindparam("known_after", type_=sa.Integer),
            )
            .scalar_subquery()
        )

    @functools.cache  # noqa: B019 - one Queries per store, a handful of queue counts
    def earliest_due(self, queues: int) -> sa.Select[Any]:
        """``queue_0`` .. ``queue_<queues - 1>``, ``after``: the earliest ETA later
        than ``after`` of a message waiting in those queues, in one statement that
        reads the first entry of each queue's scheduled index past it (a single
        ``IN`` would read and sort every scheduled message of the queues)."""
        msgs = self.tables.messages
        return self._first_etas(queues, sa.bindparam("after", type_=msgs.c.not_before.type))

    def _first_etas(self, queues: int, after: sa.ColumnElement[Any]) -> sa.Select[Any]:
        msgs = self.tables.messages
        arms = []
        for i in range(queues):
            first = (
                sa.select(msgs.c.not_before)
                .where(
                    msgs.c.queue == sa.bindparam(f"queue_{i}", type_=msgs.c.queue.type),
                    msgs.c.not_before.is_not(None),
                    msgs.c.not_before > after,
                    msgs.c.claim_id.is_(None),
                )
                .order_by(msgs.c.not_before)
                .limit(1)
                .subquery()
            )
            arms.append(sa.select(first.c.not_before))
        firsts = sa.union_all(*arms).subquery()
        return sa.select(sa.func.min(firsts.c.not_before))

    @staticmethod
    def nominate_params(
        queues: Sequence[str], now: float | None, limit: int, *, relaxed: bool = False,
        next_due: bool = False, known: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """The parameters of :meth:`nominate` for ``queues``; ``known``: stream ->
        the version held of it."""
        known = known or {}
        return {
            "now": now, "limit": limit, "relaxed": relaxed, "next_due": next_due,
            "known": list(known), "known_after": min(known.values(), default=0),
            **{f"queue_{i}": q for i, q in enumerate(queues)},
        }

    @functools.cache  # noqa: B019 - one Queries per store, a handful of column sets
    def update_messages(self, columns: tuple[str, ...]) -> sa.Update:
        """``b_delivery_id`` and the ``columns``: a batch of changes to claimed rows."""
        msgs = self.tables.messages
        return (
            msgs.update()
            .where(msgs.c.delivery_id == sa.bindparam("b_delivery_id"))
            .values({c: sa.bindparam(c) for c in columns if c != "delivery_id"})
        )

    # -- operations: counts, dead letters, results ------------------------------

    def _operations(self, t: Tables) -> None:
        msgs, dl, ev, res = t.messages, t.dead_letters, t.events, t.results
        #: ``queue``: messages waiting (ready or scheduled, not claimed).
        self.queue_size = sa.select(sa.func.count()).where(
            msgs.c.queue == sa.bindparam("queue"), msgs.c.claim_id.is_(None)
        )
        now = sa.bindparam("now", type_=msgs.c.available_at.type)
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
        #: ``now``: per queue and state, the count, oldest position, oldest
        #: claimable time and oldest claim.
        self.queue_states = (
            sa.select(
                msgs.c.queue, state, sa.func.count(), sa.func.min(msgs.c.seq),
                sa.func.min(waiting_since), sa.func.min(msgs.c.claimed_at),
            )
            .join(ev, ev.c.position == msgs.c.seq)
            .group_by(msgs.c.queue, state)
        )
        self.dead_counts = sa.select(dl.c.queue, sa.func.count()).group_by(dl.c.queue)
        queue = sa.bindparam("queue", type_=sa.String)
        #: ``queue`` (None for every queue), ``limit``: dead letters, oldest first.
        self.dead_letters = (
            sa.select(dl)
            .where(sa.or_(queue.is_(None), dl.c.queue == queue))
            .order_by(dl.c.position).limit(sa.bindparam("limit", type_=sa.Integer))
        )
        #: ``queues``, ``now``, ``limit``: messages waiting for their ETA, soonest
        #: first, with the publish that holds the body (``inspect scheduled``).
        self.scheduled_messages = (
            sa.select(
                msgs.c.stream_id, msgs.c.delivery_id, msgs.c.queue, msgs.c.priority,
                # When it becomes claimable: its ETA, or a requeue's countdown.
                msgs.c.available_at.label("not_before"),
                sa.type_coerce(ev.c.data, sa.Text).label("data"),
            )
            .join(ev, ev.c.position == msgs.c.seq)
            .where(
                msgs.c.queue.in_(_many("queues")),
                msgs.c.claim_id.is_(None),
                msgs.c.available_at > now,
            )
            .order_by(msgs.c.available_at, msgs.c.seq)
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
        #: ``delivery``: the stream of a dead letter.
        self.dead_letter_stream = sa.select(dl.c.stream_id).where(
            dl.c.delivery_id == sa.bindparam("delivery")
        )
        #: ``before``, ``limit``: streams whose final result was recorded before then.
        self.expired_results = (
            sa.select(res.c.stream_id)
            .where(res.c.date_done < sa.bindparam("before", type_=res.c.date_done.type))
            .order_by(res.c.date_done).limit(sa.bindparam("limit", type_=sa.Integer))
        )
        #: ``streams``: result rows.
        self.results = sa.select(
            res.c.stream_id, res.c.state, res.c.result, res.c.date_done
        ).where(res.c.stream_id.in_(_many("streams")))

    @functools.cache  # noqa: B019 - one Queries per store, one per table
    def every_row(self, table: sa.Table) -> sa.Select[Any]:
        """A derived table's rows in key order (comparing a rebuild)."""
        return sa.select(table).order_by(*table.primary_key.columns)

    # -- retention ----------------------------------------------------------------

    def _retention(self, t: Tables) -> None:
        ev, msgs, dl = t.events, t.messages, t.dead_letters
        before = sa.bindparam("before", type_=ev.c.recorded_at.type)
        streams = _many("streams")
        born_before = sa.and_(ev.c.version == 1, ev.c.recorded_at < before)
        #: ``before``: how many streams began before then, and the last position
        #: recorded before then (one read of the old part of the log).
        self.old_part = sa.select(
            sa.func.count().filter(born_before), sa.func.max(ev.c.position)
        ).where(ev.c.recorded_at < before)
        #: ``before``, ``after``, ``upto``, ``limit``: streams that began before
        #: ``before``, in log order after position ``after``: a range of the
        #: primary key, however long the log.
        self.old_streams = (
            sa.select(ev.c.position, ev.c.stream_id)
            .where(
                ev.c.position > sa.bindparam("after"),
                ev.c.position <= sa.bindparam("upto"),
                born_before,
            )
            .order_by(ev.c.position).limit(sa.bindparam("limit", type_=sa.Integer))
        )
        #: ``streams``: the position and time of every event of those streams.
        self.stream_events = self.dialect.each_of(
            sa.select(ev.c.stream_id, ev.c.position, ev.c.recorded_at),
            ev.c.stream_id, "streams", order_by=("stream_id", "position"),
        )
        #: ``streams``: which of them have a pending message or a dead letter.
        self.pending_streams = sa.union(
            sa.select(msgs.c.stream_id).where(msgs.c.stream_id.in_(streams)),
            sa.select(dl.c.stream_id).where(dl.c.stream_id.in_(streams)),
        )
        #: ``positions``, ``streams``: delete whole streams, their events by
        #: position (primary-key lookups) and every derived row.
        self.delete_streams = [
            ev.delete().where(ev.c.position.in_(_many("positions"))),
            # Every derived table is keyed by stream: none keeps a pruned stream.
            *(table.delete().where(table.c.stream_id.in_(streams))
              for table in t.projections),
        ]

    # -- routing: queues, bindings, transient messages ---------------------------

    def _routing(self, t: Tables, dialect: Dialect) -> None:
        q, b, tm, msgs = t.queues, t.bindings, t.transient_messages, t.messages
        names = _many("names")
        self.upsert_queue = dialect.upsert(
            q, ("name", "transient", "expires", "message_ttl", "last_active"), keys=("name",)
        )
        #: ``names``: declarations of those queues.
        self.queue_info = sa.select(
            q.c.name, q.c.transient, q.c.expires, q.c.message_ttl
        ).where(q.c.name.in_(names))
        #: ``name``: the queue's declaration.
        self.queue_declared = sa.select(q.c.name).where(q.c.name == sa.bindparam("name"))
        #: ``name``: any message in the queue.
        self.queue_has_messages = (
            sa.select(msgs.c.delivery_id).where(msgs.c.queue == sa.bindparam("name")).limit(1)
        )
        #: ``names``, ``now``.
        self.touch_queues = q.update().where(q.c.name.in_(names)).values(
            last_active=sa.bindparam("now")
        )
        self.upsert_binding = dialect.upsert(
            b, ("exchange", "queue", "routing_key", "pattern", "exchange_type"),
            keys=("exchange", "queue", "routing_key"),
        )
        #: ``exchange``, ``queue``, ``routing_key``.
        self.unbind = b.delete().where(
            b.c.exchange == sa.bindparam("exchange"),
            b.c.queue == sa.bindparam("queue"),
            b.c.routing_key == sa.bindparam("routing_key"),
        )
        #: ``exchange``: its bindings, made by any process.
        self.bindings = (
            sa.select(b).where(b.c.exchange == sa.bindparam("exchange"))
            .order_by(b.c.queue, b.c.routing_key)
        )
        # A transient message is stored only while its queue is declared: a
        # binding cached from before a sweep must not leave rows behind for a
        # queue that is gone.
        columns = [tm.c.queue, tm.c.payload, tm.c.priority, tm.c.expires_at]
        rows = dialect.rows_of(columns, "t_")
        #: Whether :attr:`insert_transient` takes one list per column (``t_`` +
        #: the column's name: a broadcast to many queues is one statement), else
        #: one parameter row per message.
        self.transient_as_lists = rows is not None
        if rows is None:  # one row of typed parameters (a JSON cast on SQLite would
            # take the numeric affinity: the payload's text goes in as it is)
            rows = sa.select(*(
                (dialect.json_from_text if c is tm.c.payload else sa.cast)(
                    sa.bindparam(c.name, type_=c.type), c.type
                ).label(c.name)
                for c in columns
            )).subquery("t")
        #: Transient messages (``queue``, ``payload``, ``priority``, ``expires_at``),
        #: for declared queues only.  Each queue's row is held (``FOR SHARE``) until
        #: the insert commits, so a sweep deleting the queue meanwhile either
        #: waits, then deletes the messages with it (it deletes the queue first),
        #: or wins, and the insert finds no queue: no message outlives its queue.
        self.insert_transient = tm.insert().from_select(
            [c.name for c in columns],
            sa.select(*(rows.c[c.name] for c in columns))
            .join(q, q.c.name == rows.c.queue)
            .with_for_update(read=True, of=q),
        )
        #: ``queues``, ``limit``: transient messages to take, highest priority first.
        self.nominate_transient = dialect.nominate(
            sa.select(tm.c.id, tm.c.queue, tm.c.payload, tm.c.expires_at)
            .where(tm.c.queue.in_(_many("queues")))
            .order_by(tm.c.priority.desc(), tm.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer)),
            tm,
        )
        #: ``ids``.
        self.delete_transient = tm.delete().where(tm.c.id.in_(_many("ids")))
        #: ``queue``.
        self.count_transient = sa.select(sa.func.count()).where(
            tm.c.queue == sa.bindparam("queue")
        )
        #: ``queue``: a queue's declaration, bindings and transient messages.
        # The queue first: it waits for the inserts holding its row, so the
        # messages they commit are there for the statements after it.
        self.forget_queue = [
            q.delete().where(q.c.name == sa.bindparam("queue")),
            b.delete().where(b.c.queue == sa.bindparam("queue")),
            tm.delete().where(tm.c.queue == sa.bindparam("queue")),
        ]
        self.purge_transient = self.forget_queue[2]
        now = sa.bindparam("now", type_=tm.c.expires_at.type)
        #: ``now``.
        self.delete_expired_transient = tm.delete().where(
            tm.c.expires_at.is_not(None), tm.c.expires_at <= now
        )
        #: ``now``: queues idle past their ``x-expires``.
        self.idle_queues = sa.select(q.c.name).where(
            q.c.expires.is_not(None), q.c.last_active + q.c.expires <= now
        )
        #: ``names``: what dies with idle queues.
        #: The queues first, as :attr:`forget_queue`.
        self.delete_idle_queues = [
            q.delete().where(q.c.name.in_(names)),
            b.delete().where(b.c.queue.in_(names)),
            tm.delete().where(tm.c.queue.in_(names)),
        ]

    # -- the task index -------------------------------------------------------------

    def _tasks(self, t: Tables) -> None:
        tasks = t.tasks
        self.insert_tasks = tasks.insert()
        #: ``streams``: unreadable streams leave the index.
        self.delete_tasks = tasks.delete().where(tasks.c.stream_id.in_(_many("streams")))
        #: ``streams``: the index rows of those tasks.
        self.tasks_by_id = sa.select(tasks).where(tasks.c.stream_id.in_(_many("streams")))

    @functools.cache  # noqa: B019 - one Queries per store, a handful of column sets
    def update_tasks(self, columns: tuple[str, ...]) -> sa.Update:
        """``b_stream_id`` and the ``columns``: a batch of changes to task rows."""
        tasks = self.tables.tasks
        return (
            tasks.update()
            .where(tasks.c.stream_id == sa.bindparam("b_stream_id"))
            .values({c: sa.bindparam(c) for c in columns})
        )

    @functools.cache  # noqa: B019 - one Queries per store, one per set of filters
    def list_tasks(self, filters: tuple[str, ...]) -> sa.Select[Any]:
        """``limit`` and each of ``filters`` (a :class:`TaskFilter` field): tasks,
        newest first.  Only the filters given are in the statement, so the planner
        sees plain equalities and ranges and picks the index that serves them."""
        tasks = self.tables.tasks
        where = []
        for name in filters:
            param = sa.bindparam(name, type_=tasks.c.created_at.type if name in (
                "since", "until") else sa.String)
            if name == "since":
                where.append(tasks.c.created_at >= param)
            elif name == "until":
                where.append(tasks.c.created_at <= param)
            else:
                where.append(tasks.c[name] == param)
        return (
            sa.select(tasks).where(*where)
            .order_by(tasks.c.created_at.desc(), tasks.c.stream_id.desc())
            .limit(sa.bindparam("limit", type_=sa.Integer))
        )
