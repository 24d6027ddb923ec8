"""Celery result backend on the event store.

::

    result_backend = "eventstore+postgresql://app@db/app"   # or eventstore+sqlite:///jobs.db

Every state is an event on the task's stream -- ``Started``, ``RetryScheduled``,
``Succeeded``, ``Failed``, ``Revoked`` -- next to the broker's own events, so a
task's history holds both what happened to its messages and what it returned.
With the event-store broker too, a worker's result names the claim its message
came with (the ``eventstore_claim`` header): it is recorded with its delivery,
or, from a claim another worker took over, as ``ResultFenced``, which changes
nothing.
Results are stored as Celery's configured result serializer encoded them; the
store never decodes one.

* ``AsyncResult.get()`` waits on the process's one LISTEN connection on
  PostgreSQL, for that task's own channel (subscribed before the first read, so
  no result slips between read and wait), and on cheap change detection on
  SQLite, instead of polling every half second.
* Chords are native: each finished header task is counted on the stream
  ``chord:<group id>`` under the version check, so the callback is applied
  exactly once.  A count reads the chord's read model, not its stream, and the
  group's size is restored once per process: the last part of a chord of ten
  thousand costs what the first did.  When the broker is the same database,
  the callback's message is published in the very transaction that completes
  the count.
* ``forget()`` appends ``Forgotten``: the result is gone, the history stays.
* ``result_expires`` (through ``celery beat``'s ``backend_cleanup``) expires the
  results recorded longer ago than it (``ResultExpired``): ``AsyncResult`` then
  reports ``PENDING``, as for any result Celery's backends have expired.  The
  history stays: whole finished streams are pruned by the same cleanup only when
  ``history_retention`` is set (default: never), or by ``celery-eventstore prune``.

Options come from ``result_backend_transport_options`` (``table_prefix``,
``schema``, ``auto_migrate``, ``notify``, ``listen_url``, ``partitioned_log``;
``history_retention``:
seconds or a ``timedelta``); give them the broker's values when both share a database.
"""

from __future__ import annotations

import base64
import builtins
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any, cast

from celery import states
from celery.backends.base import (
    BaseKeyValueStoreBackend,
    SyncBackendMixin,
    _create_chord_error_with_cause,
)
from celery.canvas import maybe_signature
from celery.exceptions import ChordError, TaskRevokedError, TimeoutError
from celery.result import GroupResult, ResultSet, allow_join_result, result_from_tuple
from kombu.utils.encoding import bytes_to_str

from . import lifecycle as lc
from .enqueue import atomic, same_database
from .exceptions import DatabaseUnavailable, TaskDeadLettered
from .storage import BROKER_PREFIX, EventStore, Listener
from .stores import shared_store

#: The message header in which the event-store transport names the claim a
#: message was delivered under; Celery copies it onto the task's request.
CLAIM_HEADER = "eventstore_claim"
#: The message property in which the transport hands over the store's identity
#: and the task stream's state as the claim left it; Celery passes it to the
#: pool process on the request, and the result is decided on it, unread.
CLAIM_STATE = "eventstore_claim_state"
#: Longest a waiter sleeps between reads when no wake-up arrives (a safety net).
WAIT_POLL_SECONDS = 1.0
#: How many chords' header sizes a process keeps (the oldest are forgotten first).
CHORD_SIZES_KEPT = 1000
logger = logging.getLogger(__name__)

STORE_OPTIONS = (
    "table_prefix", "schema", "auto_migrate", "notify", "wakeup", "listen_url", "async_commit",
    "engine_options", "partitioned_log",
)


class EventStoreBackend(SyncBackendMixin, BaseKeyValueStoreBackend):
    """Results, groups and chords as events in the celery_eventstore log."""

    supports_native_join = True
    supports_autoexpire = False
    #: Native chords: counted in the store, no chord_unlock polling task.
    implements_incr = True

    def __init__(self, app: Any = None, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url, **kwargs)
        target = url or self.url or self.app.conf.result_backend
        if not target:
            raise ValueError("the eventstore result backend needs a database URL")
        options = self.app.conf.get("result_backend_transport_options") or {}
        self.store: EventStore = shared_store(
            target, {k: options[k] for k in STORE_OPTIONS if k in options}
        )
        #: Seconds of history ``cleanup`` keeps (None: all of it).
        self.history_retention: float | None = _seconds(options.get("history_retention"))
        self._local = threading.local()
        #: group id -> its chord's header size, as restored once by this process.
        self._chord_sizes: dict[str, int] = {}

    def as_uri(self, include_password: bool = False) -> str:
        """The URL as the worker's banner shows it: with the ``eventstore+`` that
        names this backend (Celery drops it when it picks the backend)."""
        text: str = super().as_uri(include_password)
        return text if text.startswith(BROKER_PREFIX) else BROKER_PREFIX + text

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return super().__reduce__(args, {**(kwargs or {}), "url": self.url})

    # -- encoding: what the store keeps is opaque to it -------------------------

    def _wrap(self, payload: str | bytes) -> dict[str, str]:
        if isinstance(payload, bytes):
            return {"body": base64.b64encode(payload).decode("ascii"), "encoding": "base64"}
        return {"body": payload, "encoding": "utf-8"}

    @staticmethod
    def _unwrap(stored: Mapping[str, Any]) -> str | bytes:
        body = stored["body"]
        if stored.get("encoding") == "base64":
            return base64.b64decode(body)
        return str(body)

    # -- states ----------------------------------------------------------------

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: str | None = None,
        request: Any = None, **kwargs: Any,
    ) -> Any:
        task_id = bytes_to_str(task_id)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request)
        meta["task_id"] = task_id
        encoded = self._wrap(self.encode(meta))
        claim = _claim_of(request, task_id)
        known = self._claim_state(request, claim)
        command: lc.Command
        if state == states.SUCCESS:
            command = lc.Succeed(result=encoded, claim=claim)
        elif state == states.FAILURE:
            command = lc.Fail(
                exc=_describe(result), traceback=traceback, result=encoded, claim=claim
            )
        elif state == states.RETRY:
            command = lc.ScheduleRetry(exc=_describe(result), result=encoded, claim=claim)
        elif state == states.REVOKED:
            command = lc.Revoke(reason=_describe(result) or "revoked", result=encoded)
        elif state == states.STARTED:
            command = lc.Start(
                worker=getattr(request, "hostname", None), result=encoded, claim=claim
            )
        else:  # a custom state from task.update_state()
            command = lc.UpdateState(state=state, result=encoded, claim=claim)
        try:
            recorded = self.store.execute(task_id, command, known=known)
        except DatabaseUnavailable as exc:
            if state != states.STARTED:
                raise
            # STARTED is advisory and never waits for the disk (a crash may lose it
            # anyway).  Raising here would make Celery record a FAILURE for a task
            # whose body never ran -- and settle its message as finished: the task
            # would be lost to a blip of the database.  Run it without the state.
            logger.warning("task %s runs without its STARTED state: %s", task_id, exc)
            return result
        # Celery counts a chord's header task right after storing its result.
        self._local.fenced = task_id if _fenced(recorded) else None
        if claim is not None:
            self._local.wrote_under = claim
        return result

    def _claim_state(self, request: Any, claim: str | None) -> lc.JobState | None:
        """The stream's state as ``claim`` left it, handed over by the transport
        of this store, for the claim's first result write here (the next one
        would come after that write, so it reads)."""
        if claim is None or getattr(self._local, "wrote_under", None) == claim:
            return None
        given = (getattr(request, "properties", None) or {}).get(CLAIM_STATE)
        if not isinstance(given, tuple) or len(given) != 2 or given[0] != self.store.identity:
            return None
        state = given[1]
        return state if isinstance(state, lc.TaskState) else None

    def _meta_of(self, task_id: str, row: tuple[str, Any, float | None] | None) -> Any:
        """The encoded meta of a results row (synthesised when the store made the
        state itself: a task that expired before any worker saw it is REVOKED, one
        whose message was dead-lettered is a FAILURE)."""
        if row is None:
            return None
        state, stored, _ = row
        if stored is not None:
            return self._unwrap(stored)
        error: Exception = (
            TaskRevokedError(self._revoke_reason(task_id)) if state == states.REVOKED
            else TaskDeadLettered(f"task {task_id} was dead-lettered; see "
                                  f"`celery-eventstore history {task_id}`")
        )
        meta = self._get_result_meta(
            result=self.prepare_exception(error), state=state, traceback=None, request=None,
        )
        meta["task_id"] = task_id
        return self.encode(meta)

    def _revoke_reason(self, task_id: str) -> str:
        """Why the store revoked a task no worker reported on: the reason its
        ``Revoked`` recorded (``celery-eventstore revoke --reason``, a control
        broadcast), or ``expired`` for a task that expired before any worker saw it,
        as Celery says."""
        reason = "expired"
        for rec in self.store.read_stream(task_id):
            if isinstance(rec.event, lc.Revoked):
                reason = rec.event.reason
        return reason

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        task_id = bytes_to_str(task_id)
        payload = self._meta_of(task_id, self.store.results([task_id]).get(task_id))
        if payload is None:
            return {"status": states.PENDING, "result": None}
        return cast("dict[str, Any]", self.decode_result(payload))

    def mget(self, keys: Iterable[Any]) -> list[Any]:
        ids = [self._task_id_of(k) for k in keys]
        rows = self.store.results(ids)
        return [self._meta_of(i, rows.get(i)) for i in ids]

    def _task_id_of(self, key: Any) -> str:
        text: str = bytes_to_str(key)
        prefix = bytes_to_str(self.task_keyprefix)
        return text[len(prefix):] if text.startswith(prefix) else text

    def get(self, key: Any) -> Any:
        return self.mget([key])[0]

    def set(self, key: Any, value: Any) -> None:
        raise NotImplementedError("the event store writes states as events, not keys")

    def delete(self, key: Any) -> None:
        self._forget(self._task_id_of(key))

    def incr(self, key: Any) -> int:
        raise NotImplementedError("chords are counted per task on the chord's stream")

    def expire(self, key: Any, value: Any) -> None:
        """Results are expired by :meth:`cleanup` (``celery beat``), not per key."""

    def _forget(self, task_id: str) -> None:
        self.store.execute(bytes_to_str(task_id), lc.Forget())

    def cleanup(self) -> None:
        """Expire results older than ``result_expires`` (their history stays), and
        prune whole finished streams older than ``history_retention`` if it is set."""
        now = self.store.now()
        # Pruning first: expiring appends an event, which would keep the stream.
        if self.history_retention:
            self.store.prune(before=now - self.history_retention)
        if self.expires:
            self.store.expire_results(before=now - self.expires)

    # -- groups ----------------------------------------------------------------

    def _save_group(self, group_id: str, result: Any) -> Any:
        encoded = self._wrap(self.encode({"result": result.as_tuple()}))
        self.store.execute(lc.group_stream(group_id), lc.SaveGroup(result=encoded))
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        stream = lc.group_stream(group_id)
        row = self.store.results([stream]).get(stream)
        if row is None or row[1] is None:
            return None
        meta: dict[str, Any] = self.decode(self._unwrap(row[1]))
        meta["result"] = result_from_tuple(meta["result"], self.app)
        return meta

    def _delete_group(self, group_id: str) -> None:
        self.store.execute(lc.group_stream(group_id), lc.DeleteGroup())

    # -- waiting ---------------------------------------------------------------

    def _watch(self, task_ids: Iterable[str]) -> Listener | None:
        """Listen for the results of ``task_ids`` (on PostgreSQL: their channels on
        the process's one LISTEN connection); None while the database cannot be
        reached (the waiter polls meanwhile)."""
        try:
            return self.store.listener(results=task_ids)
        except DatabaseUnavailable:
            return None

    @staticmethod
    def _wait(listener: Listener | None, seconds: float) -> None:
        """Wait up to ``seconds`` for one of the watched results to be recorded."""
        if listener is None:
            time.sleep(seconds)
        else:
            listener.wait(seconds)

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        # With result_backend_always_retry, Celery retries reads and writes that
        # failed because the database was unreachable.
        return isinstance(exc, DatabaseUnavailable)

    def wait_for(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5,
        no_ack: bool = True, on_interval: Any = None,
    ) -> dict[str, Any]:
        self._ensure_not_eager()
        listener = self._watch([task_id])  # subscribed before the first read
        try:
            return self._wait_for(task_id, listener, timeout, on_interval)
        finally:
            if listener is not None:
                listener.close()

    def _wait_for(
        self, task_id: str, listener: Listener | None, timeout: float | None, on_interval: Any
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            meta: dict[str, Any] = self.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            if on_interval:
                on_interval()
            wait = WAIT_POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("The operation timed out.")
            self._wait(listener, wait)

    def get_many(
        self, task_ids: Iterable[str], timeout: float | None = None, interval: float = 0.5,
        no_ack: bool = True, on_message: Any = None, on_interval: Any = None,
        max_iterations: int | None = None, READY_STATES: Any = states.READY_STATES,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        ids = {bytes_to_str(t) for t in task_ids}
        for task_id in list(ids):
            cached = self._cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        if not ids:
            return
        listener = self._watch(ids)  # subscribed before the first read
        try:
            yield from self._get_many(
                ids, listener, timeout, on_message, on_interval, READY_STATES
            )
        finally:
            if listener is not None:
                listener.close()

    def _get_many(
        self, ids: builtins.set[str], listener: Listener | None, timeout: float | None,
        on_message: Any, on_interval: Any, READY_STATES: Any,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while ids:
            rows = self.store.results(ids)
            for task_id in sorted(ids):
                payload = self._meta_of(task_id, rows.get(task_id))
                if payload is None:
                    continue
                meta = self.decode_result(payload)
                if meta["status"] not in READY_STATES:
                    continue
                ids.discard(task_id)
                self._cache[task_id] = meta
                if on_message is not None:
                    on_message(meta)
                yield task_id, meta
            if not ids:
                return
            if on_interval:
                on_interval()
            wait = WAIT_POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"Operation timed out ({timeout})")
            self._wait(listener, wait)

    # -- chords ----------------------------------------------------------------

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        app = self.app
        gid = request.group
        if not gid:
            return
        if getattr(self._local, "fenced", None) == request.id:
            # A run whose claim another worker took over: that worker's run counts.
            return
        callback = maybe_signature(request.chord, app=app)
        size = (request.chord or {}).get("chord_size") or self._chord_size(gid, callback)
        if not size:
            return
        count = lc.CountChordPart(request.id, state, size)
        # The callback's message joins the transaction that completes the count
        # when the broker is this database: the count and the callback commit
        # together, so a crash between them cannot lose or double the callback.
        # Not on SQLite, where that open transaction would lock out the other
        # writes publishing needs; there the callback follows the commit.
        joined = same_database(app.conf.broker_url or "", self.store) and not (
            self.store.single_writer
        )
        if not joined:
            if _completes(self.store.execute(lc.chord_stream(gid), count)):
                self._apply_chord_callback(gid, callback)
            return None
        with self.store.transaction() as conn:
            if _completes(self.store.execute(lc.chord_stream(gid), count, connection=conn)):
                with atomic(conn, app=app):
                    self._apply_chord_callback(gid, callback)
        return None

    def _chord_size(self, gid: str, callback: Any) -> int | None:
        """How many header tasks report to the chord over group ``gid``, restoring
        the group once per process and chord, not at every part: a group result
        of ten thousand ids costs as much to decode as the count itself."""
        size = self._chord_sizes.get(gid)
        if size is None:
            deps = self._restore_header(gid, callback)
            if deps is None:
                return None
            size = _header_size(deps)
            while len(self._chord_sizes) >= CHORD_SIZES_KEPT:  # a bound, not a history
                self._chord_sizes.pop(next(iter(self._chord_sizes)), None)
            self._chord_sizes[gid] = size
        return size

    def _restore_header(self, gid: str, callback: Any) -> Any:
        """The chord's header results, or None after reporting to its errbacks."""
        try:
            deps = GroupResult.restore(gid, backend=self)
        except Exception as exc:  # noqa: BLE001 - reported through the chord's errbacks
            self.chord_error_from_stack(callback, ChordError(f"Cannot restore group: {exc!r}"))
            return None
        if deps is None:
            self.chord_error_from_stack(
                callback, ChordError(f"GroupResult {gid} no longer exists")
            )
        return deps

    def _apply_chord_callback(self, gid: str, callback: Any) -> None:
        deps = self._restore_header(gid, callback)  # afresh: it may have been deleted
        if deps is None:
            return
        try:
            with allow_join_result():
                ret = deps.join_native(timeout=self.app.conf.result_chord_join_timeout,
                                       propagate=True)
        except Exception as exc:  # noqa: BLE001 - a header task failed: fail the chord
            try:
                culprit = next(deps._failed_join_report())
                reason = f"Dependency {culprit.id} raised {exc!r}"
            except StopIteration:
                reason = repr(exc)
            self.chord_error_from_stack(
                callback=callback,
                exc=_create_chord_error_with_cause(message=reason, original_exc=exc),
            )
            return
        try:
            callback.delay(ret)
        except Exception as exc:  # noqa: BLE001
            self.chord_error_from_stack(
                callback=callback,
                exc=_create_chord_error_with_cause(
                    message=f"Callback error: {exc!r}", original_exc=exc
                ),
            )


def _claim_of(request: Any, task_id: str) -> str | None:
    """The claim the worker's message of ``task_id`` was delivered under: the
    transport's header on the request, when the request is that task's own (a
    failing chain also writes its other tasks' results with it).  None for a
    result written from elsewhere (another broker, an eager call, ``mark_as_done``)."""
    if request is None or getattr(request, "id", None) != task_id:
        return None
    claim = getattr(request, CLAIM_HEADER, None)
    return claim if isinstance(claim, str) else None


def _seconds(value: Any) -> float | None:
    """A duration option: seconds, a ``timedelta``, or None."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _header_size(result: Any) -> int:
    """How many header tasks report to the chord: each task of a group nested in the
    header (a chain ending in a group) counts, as in Celery's ``set_chord_size``."""
    if isinstance(result, ResultSet):
        return sum(_header_size(child) for child in result.results)
    return 1


def _fenced(recorded: Iterable[Any]) -> bool:
    return any(isinstance(r.event, lc.ResultFenced) for r in recorded)


def _completes(recorded: Iterable[Any]) -> bool:
    return any(isinstance(r.event, lc.ChordCompleted) for r in recorded)


def _describe(result: Any) -> str:
    """A one-line summary of an exception as Celery encoded it, for the history."""
    if isinstance(result, Mapping) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = ", ".join(str(m) for m in message)
        return f"{result['exc_type']}: {message}" if message else str(result["exc_type"])
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"
    return "" if result is None else str(result)
