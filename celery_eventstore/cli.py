"""``celery-eventstore``: operate the event store and read its history.

Two ways in, one set of commands::

    celery-eventstore --url sqlite:///jobs.db history TASK_ID
    celery -A proj eventstore history TASK_ID      # reads the app's broker_url

Commands: migrate, check, history, tasks, tail, queues, dead (list/retry/purge),
revoke, prune, rebuild.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import click

from . import lifecycle as lc
from .exceptions import DatabaseError, EventStoreError, UnreadableStream
from .history import LogFollower, canvas, entries_of, format_timeline, iso_time
from .monitoring import announce
from .replay import replay
from .storage import (
    SCHEMA_VERSION,
    DeadLetter,
    EventStore,
    Listener,
    LogFilter,
    QueueInfo,
    RecordedEvent,
    TaskFilter,
    TaskSummary,
    fold_stream,
)


class _Context:
    def __init__(self, url: str | None, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options
        self._store: EventStore | None = None

    @property
    def store(self) -> EventStore:
        if self._store is None:
            if not self.url:
                raise click.UsageError(
                    "give the database with --url (or run as `celery -A app eventstore`)"
                )
            self._store = EventStore(self.url, **self.options)
            announce(self._store, self.options)  # `revoke` is seen by monitors
        return self._store


def _options(prefix: str | None, schema: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if prefix:
        options["table_prefix"] = prefix
    if schema:
        options["schema"] = schema
    return options


class StoreError(click.ClickException):
    """An error from the store or the database, shown as ``error: ...`` (exit 2)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Group(click.Group):
    # Translated here, not in main(), so `celery -A app eventstore` prints the
    # same one line instead of a traceback.
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EventStoreError as exc:
            raise StoreError(str(exc)) from exc


@click.group(name="eventstore", cls=_Group, help=__doc__.split("\n\n")[0])
@click.option("--url", envvar="CELERY_EVENTSTORE_URL", help="SQLAlchemy URL of the store "
              "(an eventstore+ broker URL works too). Default: the Celery app's broker_url.")
@click.option("--table-prefix", default=None, help="table prefix (default eventstore_)")
@click.option("--schema", default=None, help="PostgreSQL schema of the tables")
@click.pass_context
def eventstore(ctx: click.Context, url: str | None, table_prefix: str | None,
               schema: str | None) -> None:
    app = getattr(ctx.obj, "app", None)  # set when run as `celery -A app eventstore`
    options = _options(table_prefix, schema)
    if app is not None and url is None:
        url = app.conf.broker_url
        transport = app.conf.broker_transport_options or {}
        for key in ("table_prefix", "schema", "partitioned_log"):
            if key in transport and key not in options:
                options[key] = transport[key]
    ctx.obj = _Context(url, options)


def _store(ctx: click.Context) -> EventStore:
    return ctx.find_object(_Context).store  # type: ignore[union-attr]


@eventstore.command()
@click.option("--sql", is_flag=True, help="print the SQL for a DBA instead of running it")
@click.option("--partitioned-log", is_flag=True,
              help="create the log partitioned by day (PostgreSQL; only when creating it)")
@click.pass_context
def migrate(ctx: click.Context, sql: bool, partitioned_log: bool) -> None:
    """Create or upgrade the schema."""
    if partitioned_log:
        ctx.find_object(_Context).options["partitioned_log"] = True  # type: ignore[union-attr]
    store = _store(ctx)
    if sql:
        version = store.schema_version()
        if version >= SCHEMA_VERSION:
            click.echo(f"-- schema at version {version}: nothing to migrate")
        else:
            click.echo(store.migration_sql(version))
        return
    applied = store.migrate()
    click.echo(f"schema at version {store.schema_version()}"
               + (f" (applied {', '.join(map(str, applied))})" if applied else " (up to date)"))


@eventstore.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Connectivity, driver, schema version, wake-ups, clock skew, and unreadable events."""
    store = _store(ctx)
    store.ping()
    click.echo(f"database   {store!r}")
    click.echo(f"driver     {store.driver()}")
    preparing = store.statement_preparing()
    if preparing is not None:
        click.echo(f"statements {preparing}")
    click.echo(f"schema     version {store.schema_version()}")
    skew = store.clock_skew()
    click.echo(f"clock skew {skew * 1000:+.1f} ms (database minus this host)")
    listener = store.listener()
    try:
        click.echo(f"wake-ups   {_probe_wakeups(store, listener)}")
    finally:
        listener.close()
    for warning in store.maintenance_warnings():
        click.echo(f"warning    {warning}")
    unreadable = store.unreadable_streams()
    for error in unreadable:
        click.echo(f"unreadable {error}")
    click.echo(f"log        {len(unreadable)} unreadable stream(s)")
    if unreadable:
        raise StoreError(
            f"{len(unreadable)} stream(s) hold unreadable events; their messages are "
            "quarantined as dead letters (see `dead`)"
        )


def _probe_wakeups(store: EventStore, listener: Listener) -> str:
    """Send a wake-up through the store and say whether the listener heard it.

    The probe is a transient message, so it needs a role that may write: a
    read-only one (an auditor's) gets the reason instead, and the rest of
    ``check`` still runs.
    """
    listener.poll()
    probe = f"check-{time.time_ns()}"
    try:
        store.declare_queue(QueueInfo(probe, transient=True, expires=1))
    except DatabaseError as exc:
        return f"not tested: the probe could not be written ({exc})"
    try:
        store.put_transient([(probe, {"probe": True}, 0, None)])
        woke = listener.wait(2.0)
    finally:
        store.forget_queue(probe)
    return "working" if woke else "NOT received (consumers will poll)"


def _events_json(recorded: list[RecordedEvent]) -> list[dict[str, Any]]:
    out = []
    for entry, rec in zip(entries_of(recorded), recorded, strict=False):
        item = entry.as_json()
        item["stream"] = rec.stream
        item["position"] = rec.position
        out.append(item)
    return out


@eventstore.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a timeline")
@click.option("--tree", is_flag=True,
              help="the whole canvas: parents, children, group and chord streams")
@click.pass_context
def history(ctx: click.Context, task_id: str, as_json: bool, tree: bool) -> None:
    """The whole story of one task (or group:ID / chord:ID)."""
    store = _store(ctx)
    # A bare group id (GroupResult.id) names its group:/chord: streams.
    candidates = [task_id, lc.group_stream(task_id), lc.chord_stream(task_id)]
    found = {s: r for s in candidates if (r := store.read_stream(s))}
    if not found:
        found = _group_members(store, task_id)
    if not found:
        raise click.ClickException(f"no events for {task_id!r}: unknown task, or pruned")
    if tree:
        streams = canvas(store, next(iter(found)))
    else:
        streams = [task_id] if task_id in found else list(found)
    documents = []
    for stream in streams:
        recorded = found.get(stream) or store.read_stream(stream)
        if as_json:
            documents.append({"stream": stream, "events": _events_json(recorded)})
        else:
            click.echo(f"== {stream}  {_summary(stream, recorded)}")
            click.echo(format_timeline(entries_of(recorded)))
    if as_json:
        click.echo(json.dumps(documents if len(documents) > 1 or tree else documents[0],
                              indent=2, default=str))


#: Most members ``history GROUP_ID`` shows of a group that was never saved.
_MAX_MEMBERS = 1000


def _group_members(store: EventStore, group_id: str) -> dict[str, list[RecordedEvent]]:
    """The streams of a group's members, oldest first, found by the task index: a
    plain ``group()`` whose result was never saved has no stream of its own."""
    members = store.tasks(TaskFilter(group_id=group_id), limit=_MAX_MEMBERS)
    return {t.task_id: store.read_stream(t.task_id) for t in reversed(members)}


def _summary(stream: str, recorded: list[RecordedEvent]) -> str:
    """The header of a stream's timeline: its state, and its task and links if known."""
    kind = lc.stream_kind(stream)
    if kind is lc.StreamKind.CHORD:
        done = any(isinstance(r.event, lc.ChordCompleted) for r in recorded)
        parts = ["state=" + ("completed" if done else "counting")]
    elif kind is lc.StreamKind.GROUP:
        last = next((r.event for r in reversed(recorded)), None)
        parts = ["state=" + ("deleted" if isinstance(last, lc.GroupDeleted) else "saved")]
    else:
        try:
            state = fold_stream(stream, recorded)
            parts = [f"state={state.custom_state or state.result_state.value}"]
        except UnreadableStream as error:
            parts = [f"state=UNREADABLE (position {error.position}: {error.reason})"]
    meta = next((r.metadata for r in recorded if isinstance(r.event, lc.Published)), None)
    for key in ("task", "parent_id", "group"):
        if meta and meta.get(key) and meta.get(key) != stream:
            parts.append(f"{key.removesuffix('_id')}={meta[key]}")
    return "  ".join(parts)


def _event_types(ctx: click.Context, param: click.Parameter,
                 values: tuple[str, ...]) -> tuple[str, ...]:
    """Event type names as stored, from any case; an unknown one is refused."""
    by_folded = {name.casefold(): name for name in lc.EVENT_TYPES}
    unknown = [v for v in values if v.casefold() not in by_folded]
    if unknown:
        raise click.BadParameter(
            f"{unknown[0]!r} is not an event type; one of {', '.join(sorted(by_folded.values()))}"
        )
    return tuple(by_folded[v.casefold()] for v in values)


def _when(text: str | None, now: float) -> float | None:
    """A point in time: ISO-8601 (UTC unless it says otherwise), or a duration ago
    (``90s``, ``15m``, ``1h``, ``2d``, ``1w``, or seconds)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - _duration(text)
        except click.BadParameter:
            raise click.BadParameter(
                f"{text!r} is neither an ISO time (2026-12-06T13:00) nor a duration ago "
                "(1h, 2d, 3600)"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _event_json(rec: RecordedEvent) -> dict[str, Any]:
    (entry,) = entries_of([rec])
    return {**entry.as_json(), "stream": rec.stream, "position": rec.position}


@eventstore.command()
@click.option("-f", "--follow", is_flag=True, help="keep printing new events")
@click.option("--queue", default=None, help="only events of tasks in this queue")
@click.option("--task", "task_name", default=None, help="only this task name")
@click.option("--type", "event_types", multiple=True, callback=_event_types,
              metavar="TYPE", help="only this event type (any case; repeat for several)")
@click.option("--since", default=None, metavar="WHEN",
              help="only events recorded since: ISO time or a duration ago (1h, 2d)")
@click.option("--until", default=None, metavar="WHEN",
              help="only events recorded until: ISO time or a duration ago")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=None,
              help="show the last N matching events first  [default: 20; all of --since]")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.pass_context
def tail(ctx: click.Context, follow: bool, queue: str | None, task_name: str | None,
         event_types: tuple[str, ...], since: str | None, until: str | None,
         lines: int | None, as_json: bool) -> None:
    """The live event feed, read from the end of the log.

    It reads only the events it prints (newest first, by position), never the
    log from its beginning; ``-f`` follows from where it started."""
    if follow and until is not None:
        raise click.UsageError("--follow cannot stop at --until")
    store = _store(ctx)
    now = store.now()
    where = LogFilter(
        types=event_types or None, name=task_name, queue=queue,
        since=_when(since, now), until=_when(until, now),
    )

    def show(rec: RecordedEvent) -> None:
        if as_json:
            click.echo(json.dumps(_event_json(rec), default=str))
            return
        (entry,) = entries_of([rec])
        click.echo(f"{rec.stream:<36} {format_timeline([entry])}")  # whole: `history` takes it

    end = store.last_position()  # followed from here: nothing is printed twice or missed
    for rec in _backlog(store, where, end, lines):
        show(rec)
    if follow:
        _follow(store, where, end, show)


def _backlog(
    store: EventStore, where: LogFilter, end: int, lines: int | None
) -> Iterator[RecordedEvent]:
    """The matching events up to position ``end``: the last ``lines`` of them, read
    from the end; or, from ``since`` without ``lines``, all of them, oldest first."""
    if lines is None and where.since is not None:
        after = 0
        while page := store.read_log(where, after=after, before=end + 1, limit=1000):
            yield from page
            after = page[-1].position
        return
    wanted = 20 if lines is None else lines
    if wanted:
        yield from reversed(store.read_log(where, before=end + 1, limit=wanted,
                                           newest_first=True))


def _follow(
    store: EventStore, where: LogFilter, after: int, show: Callable[[RecordedEvent], None]
) -> None:
    """Print the matching events committed after position ``after`` until interrupted."""
    types = set(where.types or ())
    known: dict[str, TaskSummary | None] = {}  # task streams by id, from the task index

    def keep(rec: RecordedEvent) -> bool:
        if types and rec.type not in types:
            return False
        if where.name is None and where.queue is None:
            return True
        task = known.get(rec.stream)
        return task is not None and (
            (where.name is None or task.name == where.name)
            and (where.queue is None or task.queue == where.queue)
        )

    listener = store.listener()
    follower = LogFollower(store, after)
    try:
        while True:
            batch = follower.poll()
            if where.name is not None or where.queue is not None:
                # A task's row commits with its first event: one look-up per stream.
                unknown = {r.stream for r in batch if r.stream not in known}
                found = store.task_summaries(unknown)
                known.update({s: found.get(s) for s in unknown})
            for rec in batch:
                if keep(rec):
                    show(rec)
            if not batch:
                listener.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()


# -- tasks -------------------------------------------------------------------------


@eventstore.command("tasks")
@click.option("--name", default=None, help="only tasks of this name")
@click.option("--state", default=None, help="only tasks in this state (SUCCESS, FAILURE...)")
@click.option("--queue", default=None, help="only tasks whose latest message went to this queue")
@click.option("--worker", default=None, help="only tasks this worker started (celery@host)")
@click.option("--since", default=None, metavar="WHEN",
              help="only tasks published since: ISO time or a duration ago (1h, 2d)")
@click.option("--until", default=None, metavar="WHEN",
              help="only tasks published until: ISO time or a duration ago")
@click.option("--parent", "parent_id", default=None, help="only children of this task")
@click.option("--root", "root_id", default=None, help="only tasks of this workflow root")
@click.option("--group", "group_id", default=None, help="only members of this group")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="most tasks listed")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.pass_context
def tasks_command(ctx: click.Context, name: str | None, state: str | None,
                  queue: str | None, worker: str | None, since: str | None,
                  until: str | None, parent_id: str | None, root_id: str | None,
                  group_id: str | None, limit: int, as_json: bool) -> None:
    """Find tasks by name, state, queue, worker, time or links.

    Newest first (ties by task id), from the task index: not a scan of the log."""
    store = _store(ctx)
    now = store.now()
    if state is not None and state.upper() in lc.ResultState.__members__:
        state = state.upper()  # Celery's states in any case; custom ones as given
    found = store.tasks(TaskFilter(
        name=name, state=state, queue=queue, worker=worker, parent_id=parent_id,
        root_id=root_id, group_id=group_id, since=_when(since, now), until=_when(until, now),
    ), limit=limit)
    if as_json:
        click.echo(json.dumps([_task_json(t) for t in found], indent=2))
        return
    for t in found:
        when = datetime.fromtimestamp(t.created_at, timezone.utc).isoformat(timespec="seconds")
        click.echo(f"{t.task_id:<36} {when} {t.state:<8} {t.name or '-'} "
                   f"queue={t.queue or '-'} worker={t.worker or '-'}")
    if not found:
        click.echo("no tasks")


def _task_json(task: TaskSummary) -> dict[str, Any]:
    return {**vars(task), "created_at": iso_time(task.created_at)}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@eventstore.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--at", "at", default=None, metavar="TIME|POSITION",
              help="the queues as they were then, with their tasks, replayed from the "
              "log: a log position (an integer), an ISO-8601 time (UTC unless it "
              "says) or an age such as 10m, 2h, 1d")
@click.pass_context
def queues(ctx: click.Context, as_json: bool, at: str | None) -> None:
    """Ready, scheduled, in-flight and dead counts per queue, with ages."""
    store = _store(ctx)
    if at is not None:
        _queues_at(store, at, as_json)
        return
    stats = store.queue_stats()
    if as_json:
        click.echo(json.dumps([vars(s) for s in stats], indent=2))
        return
    click.echo(f"{'queue':<30} {'ready':>7} {'oldest':>7} {'scheduled':>9} "
               f"{'in-flight':>9} {'oldest':>7} {'dead':>6}")
    for s in stats:
        click.echo(f"{s.queue:<30} {s.ready:>7} {_age(s.oldest_ready_age):>7} "
                   f"{s.scheduled:>9} {s.claimed:>9} {_age(s.oldest_lease_age):>7} {s.dead:>6}")
    if not stats:
        click.echo("no messages")


def _queues_at(store: EventStore, at: str, as_json: bool) -> None:
    """``queues --at``: every queue folded from the log up to a point, with its tasks."""
    position, when = _point_in_time(store, at)
    then = replay(store, position=position, at=when)
    if as_json:
        click.echo(json.dumps({
            "position": then.position,
            "time": iso_time(then.time),
            "queues": [q.as_json() for q in then.queues],
            "unreadable": [str(e) for e in then.unreadable],
        }, indent=2))
        return
    click.echo(f"as of position {then.position} ({iso_time(then.time)}), replayed from the log")
    click.echo(f"{'queue':<30} {'ready':>7} {'scheduled':>9} {'in-flight':>9} {'dead':>6}")
    for q in then.queues:
        click.echo(f"{q.queue:<30} {len(q.ready):>7} {len(q.scheduled):>9} "
                   f"{len(q.in_flight):>9} {len(q.dead):>6}")
        for label, tasks in (("ready", q.ready), ("scheduled", q.scheduled),
                             ("in flight", [f"{t} (by {w})" for t, w in q.in_flight]),
                             ("dead", q.dead)):
            for task in tasks:
                click.echo(f"  {label:<10} {task}")
    if not then.queues:
        click.echo("no messages")
    for error in then.unreadable:
        click.echo(f"unreadable {error} (left out)")


def _point_in_time(store: EventStore, text: str) -> tuple[int | None, float | None]:
    """``(position, None)`` for a log position, ``(None, epoch seconds)`` for a time:
    an ISO-8601 time (UTC unless it says otherwise) or an age (``10m``: ten minutes
    before now by the store's clock)."""
    text = text.strip()
    if text.isdigit():
        return int(text), None
    if text and text[-1] in _UNITS:
        return None, store.now() - _duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a log position, an ISO-8601 time or an age like 10m",
            param_hint="--at",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return None, moment.timestamp()


@eventstore.group(invoke_without_command=True)
@click.option("--queue", default=None, help="only the dead letters of this queue")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a list")
@click.pass_context
def dead(ctx: click.Context, queue: str | None, as_json: bool) -> None:
    """Dead-lettered messages (list; `dead retry`, `dead purge`)."""
    if ctx.invoked_subcommand is not None:
        return
    store = _store(ctx)
    letters = store.dead_letters(queue)
    names = store.task_names(d.stream for d in letters)
    if as_json:
        click.echo(json.dumps(
            [_dead_letter_json(d, names.get(d.stream)) for d in letters], indent=2
        ))
        return
    for d in letters:
        when = datetime.fromtimestamp(d.dead_at, timezone.utc).isoformat(timespec="seconds")
        click.echo(f"{d.delivery}  task={names.get(d.stream, '?')} id={d.stream} "
                   f"queue={d.queue} at={when} reason={d.reason}")
    if not letters:
        click.echo("no dead letters")


def _dead_letter_json(letter: DeadLetter, task_name: str | None) -> dict[str, Any]:
    return {**vars(letter), "dead_at": iso_time(letter.dead_at), "task_name": task_name}


@dead.command("retry")
@click.argument("delivery", required=False)
@click.option("--all", "retry_all", is_flag=True, help="retry every dead letter")
@click.pass_context
def dead_retry(ctx: click.Context, delivery: str | None, retry_all: bool) -> None:
    """Publish dead letters again, as new deliveries on the same streams."""
    store = _store(ctx)
    if not delivery and not retry_all:
        raise click.UsageError("name a delivery id or pass --all")
    targets = [d.delivery for d in store.dead_letters()] if retry_all else [delivery or ""]
    for target in targets:
        click.echo(f"{target} -> {store.retry_dead(target)}")


@dead.command("purge")
@click.option("--queue", default=None)
@click.pass_context
def dead_purge(ctx: click.Context, queue: str | None) -> None:
    """Remove dead letters from the list (the history keeps them)."""
    click.echo(f"purged {_store(ctx).purge_dead(queue)} dead letters")


@eventstore.command()
@click.argument("task_id")
@click.option("--reason", default="revoked from the command line", show_default=True,
              help="why, kept in the history and in the result's TaskRevokedError")
@click.option("--force", is_flag=True,
              help="revoke a task id the store has never seen (a task published "
              "later with this id is then discarded)")
@click.pass_context
def revoke(ctx: click.Context, task_id: str, reason: str, force: bool) -> None:
    """Durably revoke a task: no pending or future delivery of it will run."""
    store = _store(ctx)
    _refuse_unknown_task(store, task_id, force)
    recorded = store.revoke(task_id, reason)
    discarded = sum(isinstance(r.event, lc.Discarded) for r in recorded)
    click.echo(f"revoked {task_id}: {discarded} pending deliveries discarded"
               if recorded else f"{task_id} was already revoked")


def _refuse_unknown_task(store: EventStore, task_id: str, force: bool) -> None:
    """A revoke of an id the store never saw is most likely a typo: refuse it,
    before anything is written, unless ``--force`` says it is meant."""
    if force or lc.stream_kind(task_id) is not lc.StreamKind.TASK:
        return
    if not store.read_stream(task_id):
        raise click.ClickException(
            f"no events for {task_id!r}: unknown task, or pruned; nothing revoked "
            "(--force revokes it ahead of its publish)"
        )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    try:
        return float(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else float(text)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration like 30d, 12h or 3600") from None


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal; nothing at all when stdout is not one."""
    out = sys.stdout
    if not out.isatty():
        yield None
        return
    with click.progressbar(length=1, label=label, file=out) as bar:

        def update(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        yield update


@eventstore.command()
@click.option("--older-than", required=True, help="e.g. 30d, 12h, 3600 (seconds)")
@click.option("--batch", default=500, show_default=True,
              help="streams examined per transaction")
@click.option("--dry-run", is_flag=True, help="count the streams that would go; delete nothing")
@click.pass_context
def prune(ctx: click.Context, older_than: str, batch: int, dry_run: bool) -> None:
    """Delete whole finished streams older than the retention."""
    store = _store(ctx)
    cutoff = store.now() - _duration(older_than)
    with _progress("counting" if dry_run else "pruning") as progress:
        pruned = store.prune(before=cutoff, batch=batch, progress=progress, dry_run=dry_run)
    click.echo(f"would prune {pruned} streams (dry run: nothing deleted)" if dry_run
               else f"pruned {pruned} streams")


@eventstore.command()
@click.option("--days", default=7, show_default=True, type=click.IntRange(min=0),
              help="make the partitions of today and this many days after it")
@click.pass_context
def maintain(ctx: click.Context, days: int) -> None:
    """Make the partitions of the coming days (a partitioned log; workers do it too)."""
    store = _store(ctx)
    if not store.partitioned:
        click.echo("the log is not partitioned: nothing to do")
        return
    made = store.maintain(days)
    for name in made:
        click.echo(f"made {name}")
    click.echo(f"{len(store.partitions.days())} daily partitions ({len(made)} made)")


@eventstore.command()
@click.pass_context
def rebuild(ctx: click.Context) -> None:
    """Rebuild the derived tables from the log."""
    unreadable: list[UnreadableStream] = []
    with _progress("replaying") as progress:
        replayed = _store(ctx).rebuild(progress=progress, on_unreadable=unreadable.append)
    click.echo(f"replayed {replayed} events")
    for error in unreadable:
        click.echo(f"unreadable {error} (rebuilt up to it; its messages are dead letters)")


def main(argv: list[str] | None = None) -> int:
    try:
        eventstore.main(args=argv, prog_name="celery-eventstore", standalone_mode=False)
    except click.exceptions.Abort:
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except EventStoreError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
