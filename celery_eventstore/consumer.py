"""The consuming side of the transport: one owner for what a channel holds and owes.

kombu gives a virtual transport's unacked bookkeeping to its ``QoS`` and the event
loop's plumbing to a poller (the Redis transport's ``MultiChannelPoller``).  The
same split here:

* :class:`QoS`, one per channel, owns the prefetch credit, the claim in flight,
  the claims held (with their leases) and the buffer of acks not yet written.
  Every store call about them -- claim with the pending acks, ack, reject,
  restore, renew -- is one of its methods; nothing else writes its state.
* :class:`Poller`, one per transport under the worker's event loop (the hub),
  turns wake-ups into claims, runs them on the :class:`Claimer` thread and
  delivers what they bring.  It asks the QoS whether and how much to claim.
* :class:`Keeper`, one thread per consuming transport, writes acks that waited
  ``ack_flush_interval``, renews leases past half their length and sweeps
  expired transient queues.

Threads and locks
=================

Who calls what:

* the consuming thread (the hub's, or the caller of ``drain_events``): the
  claim cycle (:meth:`QoS.reserve`, :meth:`QoS.claim_done`,
  :meth:`QoS.claim_failed`, :meth:`QoS.claim_due`), kombu's ``append`` and
  ``restore_unacked``; under the hub, every :class:`Poller` method;
* the claimer thread: :meth:`QoS.claim`, one claim at a time;
* the keeper thread: :meth:`QoS.flush_acks` and :meth:`QoS.renew_leases`;
* any thread (a thread pool's workers settle messages too): :meth:`QoS.ack`,
  :meth:`QoS.reject`.

Each QoS has one lock, ``_lock``, over all of its own state: the held claims,
the ack buffer and the claim cycle's flags.  It is held only to read or change
that state, never across a store call: a method takes what it needs under the
lock, calls the store without it, and puts back what the call did not use (acks
a failed write could not record go back to the buffer's front).  So each
buffered ack is written by exactly one call, whichever thread makes it, and a
slow database never blocks an ack.  kombu's own ``_delivered`` and ``_dirty``
keep kombu's rule: the consuming thread appends, any thread may mark a tag done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kombu.transport import virtual

from .storage import ANY_QUEUE, ClaimedMessage, ClaimRef, EventStore, Outcome

if TYPE_CHECKING:
    from .transport import Channel, Transport

logger = logging.getLogger(__name__)

#: How often the keeper renews the leases of held messages (only those past half).
RENEW_INTERVAL = 1.0
#: How often a consuming process sweeps expired transient queues and messages.
SWEEP_INTERVAL = 10.0
#: How long a closing channel (and its connection) waits for the claim round or
#: the keeper's ack flush in flight: the acks it carries are written, or put back
#: for the closing channel to write or leave to the next connection, not lost.
#: Bounded: a database that no longer answers must not hold a reconnect for ever.
CLOSE_WAIT_SECONDS = 5.0

#: What a claim hands to the consumers: kombu payloads and the queue of each.
Batch = list[tuple[dict[str, Any], str]]

#: Acks a closing channel could not write, by store.  Celery reconnects by
#: closing its connection and opening another on the same (process-wide) store:
#: the new channel's QoS adopts them and writes them with its first claim round,
#: so a task that finished under the old connection is not run again when its
#: lease runs out.  An ack is fenced by its claim, so whoever writes it decides
#: it as the closing channel would have.
_unwritten_acks: weakref.WeakKeyDictionary[EventStore, list[ClaimRef]] = (
    weakref.WeakKeyDictionary()
)
_unwritten_lock = threading.Lock()


def leave_acks(store: EventStore, refs: Sequence[ClaimRef]) -> None:
    """Leave acks for the next channel on ``store`` (see :data:`_unwritten_acks`)."""
    if refs:
        with _unwritten_lock:
            _unwritten_acks.setdefault(store, []).extend(refs)


def adopt_acks(store: EventStore) -> list[ClaimRef]:
    """The acks closed channels left for ``store``, once."""
    with _unwritten_lock:
        return _unwritten_acks.pop(store, [])


class QoS(virtual.QoS):
    """One channel's prefetch credit, claim in flight, held claims and ack buffer.

    A claim reserves the credit it may fill (:meth:`reserve`) and gives it back
    when it comes back (:meth:`claim_done`), so the messages in flight count
    against the prefetch window as delivered ones do.  A wake-up that cannot
    start a claim (one is in flight, or there is no credit) is remembered, and
    :meth:`claim_due` says when to claim for it.  Acks wait in a buffer for the
    next claim, which writes them in its own transaction, or for the keeper.
    """

    channel: Channel

    def __init__(self, channel: Channel, prefetch_count: int = 0) -> None:
        super().__init__(channel, prefetch_count)
        self.store: EventStore = channel.store
        self._consumer: str = channel.connection.consumer_id
        self._lock = threading.Lock()
        #: delivery tag -> (claim, when to renew its lease by time.monotonic()).  Not
        #: by a wall clock: a host clock step must not delay a renewal (the database
        #: decides when a lease runs out, this only decides when to ask again).
        self._held: dict[str, tuple[ClaimRef, float]] = {}
        #: Deliveries already reported as taken over: reported once, not per call.
        self._reported_stale: set[str] = set()
        #: Acks not yet written; first those a closed channel could not write.
        self._acks: list[ClaimRef] = adopt_acks(self.store)
        #: When the oldest buffered ack came.
        self._acks_since: float | None = time.monotonic() if self._acks else None
        #: Writes in flight carrying acks taken from the buffer (a claim round on
        #: the claimer thread, the keeper's flush); a failed one puts them back,
        #: so a closing channel waits for them (:meth:`flush_acks_at_close`).
        self._carrying = 0
        self._carried = threading.Condition(self._lock)
        #: The limit of the claim in flight (0: none); it counts against the credit.
        self._claiming = 0
        #: A wake-up came while a claim was in flight: claim again after it.
        self._again = False
        #: The last claim filled its limit, or a wake-up found no credit.
        self._more = False
        #: The last claim's round took up its whole limit, claimed or settled
        #: (a message it settled instead -- expired, finished, dead-lettered --
        #: fills a slot, and may leave others waiting).
        self._filled = False
        #: When (time.monotonic()) the next scheduled message of the claimed queues
        #: is due, as the last claim that came back short found; None: none known.
        self._due: float | None = None

    # -- the claim cycle (consuming thread) ------------------------------------

    @property
    def maybe_more(self) -> bool:
        """Whether messages may be waiting that no claim has taken yet."""
        with self._lock:
            return self._more

    def credit(self) -> int:
        """How many messages a claim may take now."""
        with self._lock:
            return self._credit()

    def _credit(self) -> int:
        estimate = self.can_consume_max_estimate()
        batch = self.channel.claim_batch
        window = batch if estimate is None else min(estimate, batch)
        return max(window - self._claiming, 0)

    def _refill_at(self) -> int:
        """With a backlog waiting, claim again once half the prefetch window is
        free: fewer, larger transactions than one claim per finished task."""
        return max(1, (self.prefetch_count or 0) // 2)

    def reserve(self) -> int:
        """Reserve the credit for a claim and return its limit, or 0 when no
        claim may start now (the wake-up is remembered for :meth:`claim_due`)."""
        with self._lock:
            if self._claiming:
                # The claim in flight may have nominated before this wake-up's
                # message committed: claim again when it comes back, whatever
                # credit is left now (its own result decides _more).
                self._again = True
                return 0
            credit = self._credit()
            if credit <= 0:
                self._more = True  # claim once the consumers free some credit
                return 0
            self._claiming = credit
            return credit

    def claim_done(self, count: int) -> None:
        """The claim in flight brought ``count`` messages; give back its reservation."""
        with self._lock:
            self._more = count >= self._claiming or self._filled
            self._claiming = 0

    @property
    def last_claim_filled(self) -> bool:
        """Whether the last claim's round took up its whole limit (claimed or
        settled): more messages may be waiting, whatever it brought."""
        with self._lock:
            return self._filled

    def claim_failed(self) -> None:
        """The claim in flight raised (or never ran): give back its reservation."""
        with self._lock:
            self._claiming = 0

    def claim_due(self) -> bool:
        """Whether to claim now: a wake-up came during the last claim and there
        is credit, or a backlog waits and half the prefetch window is free."""
        with self._lock:
            if self._claiming:
                return False  # keep a remembered wake-up for when it comes back
            again, self._again = self._again, False
            credit = self._credit()
            if again and credit <= 0:
                self._more = True
                return False
            return again or (self._more and credit >= self._refill_at())

    # -- ETAs: when to claim without a wake-up (consuming thread) --------------

    def next_due(self) -> float | None:
        """When (``time.monotonic()``) a scheduled message is due, if one is known."""
        with self._lock:
            return self._due

    def due_now(self) -> bool:
        """Whether a scheduled message is due by now; it is then forgotten, as the
        claim this asks for looks for the next one."""
        with self._lock:
            if self._due is None or self._due > time.monotonic():
                return False
            self._due = None
            return True

    def _set_due(self, due: float | None, at: float | None) -> None:
        """Remember the next ETA (the store's clock) as a time on this host's
        monotonic clock: as far from now as it was from ``at``, the round's time
        by the same clock.  Counted from after the round, the timer never fires
        before the database finds the message due (an estimate of the host's
        offset from the database's clock could be early by half a round trip,
        and bring an empty claim)."""
        if at is None:
            at = self.store.now()
        when = None if due is None else time.monotonic() + (due - at)
        with self._lock:
            self._due = when

    # -- claiming (claimer or consuming thread) --------------------------------

    def claim(
        self, queues: Sequence[str], limit: int, *, noack: Collection[str] = ()
    ) -> list[ClaimedMessage]:
        """Write the buffered acks and claim up to ``limit`` messages from
        ``queues``, in one transaction, and hold the claims (those from the
        ``noack`` queues are acked at once instead)."""
        with self._lock:
            self._filled = False  # until this round says otherwise
        if not queues:
            self.flush_acks()
            return []
        asked = time.monotonic()  # the leases start after this: renew early, not late
        # Consumers only ask for the next ETA: a basic_get does not wait for one.
        consuming = bool(self.channel._consumers)
        with self._carrying_acks() as acks:
            done = self.store.claim_round(
                acks, queues, limit, self._consumer, self.channel.visibility_timeout,
                max_claims=self.channel.max_claims, next_due=consuming,
            )
        outcomes, claimed = done.outcomes, done.claimed
        filled = done.nominated >= limit
        if filled:
            with self._lock:
                self._filled = True
        elif consuming:
            # Nothing more is due now: the round brought when the next one is.
            self._set_due(done.next_due, done.at)
        self._warn_stale(outcomes, "ack")
        self._hold([m for m in claimed if m.queue not in noack], asked)
        at_once = [m.ref for m in claimed if m.queue in noack]
        if at_once:
            self.store.ack(at_once)
        return claimed

    def _hold(self, claimed: Iterable[ClaimedMessage], asked: float) -> None:
        renew_at = asked + self.channel.visibility_timeout / 2
        with self._lock:
            for m in claimed:
                self._held[m.claim] = (m.ref, renew_at)

    def _release(self, tags: Iterable[str]) -> list[ClaimRef]:
        """Stop holding these claims; the ones still held, to settle once."""
        with self._lock:
            entries = [self._held.pop(tag, None) for tag in tags]
        return [entry[0] for entry in entries if entry is not None]

    # -- outcomes (any thread) -------------------------------------------------

    def ack(self, delivery_tag: str) -> None:
        """Buffer the ack; a full buffer is written at once, on this thread."""
        for ref in self._release([delivery_tag]):
            if self._buffer_ack(ref):
                self.flush_acks()
        super().ack(delivery_tag)

    def ack_at_once(self, delivery_tag: str) -> None:
        """Write the ack now (``basic_get`` without acknowledgement)."""
        refs = self._release([delivery_tag])
        if refs:
            self._warn_stale(self.store.ack(refs), "ack")

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Give the claim back (``requeue``) or dead-letter it.  A dead letter made
        while the message is being handed to its consumer waits until the hand-over
        returns (see :func:`handing_over`)."""
        refs = self._release([delivery_tag])
        if refs:
            held_back = getattr(_handing_over, "rejects", None)
            if held_back is not None and not requeue:
                held_back.append((self, refs))
            else:
                self.write_reject(refs, requeue=requeue)
        super().reject(delivery_tag, requeue=False)

    def write_reject(self, refs: list[ClaimRef], *, requeue: bool) -> None:
        self.flush_acks()  # what was acked before is written before
        reason = "rejected and requeued" if requeue else "rejected by the consumer"
        self._warn_stale(self.store.reject(refs, requeue=requeue, reason=reason), "reject")

    def restore(self, tags: Iterable[str]) -> None:
        """Give these claims back to their queues."""
        refs = self._release(tags)
        if refs:
            self.store.restore(refs)

    def give_back(self, batch: Batch) -> None:
        """Give back claims that were never delivered (the consumer is closing)."""
        tags = [payload["properties"]["delivery_tag"] for payload, _ in batch]
        try:
            self.restore(tags)
        except Exception as exc:  # their leases bring them back instead
            logger.warning("could not give back %d undelivered claim(s): %s", len(tags), exc)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Write the buffered acks, then give back every delivered claim not
        acked, in one transaction (kombu calls it as the channel closes)."""
        self.flush_acks()
        self._flush()
        delivered = []
        while self._delivered:
            delivered.append(self._delivered.popitem())
        self._delivered.clear()
        refs = self._release(tag for tag, _ in delivered)
        if not refs:
            return []
        try:
            self.store.restore(refs)
        except Exception as exc:  # reported by kombu; the leases bring them back anyway
            return [(exc, message) for _, message in delivered]
        return []

    # -- the ack buffer (any thread) -------------------------------------------

    def _buffer_ack(self, ref: ClaimRef) -> bool:
        """Buffer one ack; whether the buffer is now full."""
        with self._lock:
            self._acks.append(ref)
            if self._acks_since is None:
                self._acks_since = time.monotonic()
            return len(self._acks) >= self.channel.claim_batch

    def _take_acks(self, older_than: float = 0.0, *, carry: bool = False) -> list[ClaimRef]:
        """Empty the buffer (only once its oldest ack has waited ``older_than`` s);
        with ``carry``, count a write in flight for them, under the same lock (a
        closing channel must never see the buffer empty and nothing in flight)."""
        with self._lock:
            since = self._acks_since
            if since is None or time.monotonic() - since < older_than:
                return []
            refs, self._acks = self._acks, []
            self._acks_since = None
            if carry and refs:
                self._carrying += 1
        return refs

    def _return_acks(self, refs: list[ClaimRef]) -> None:
        """Put back acks a failed write did not record, ahead of newer ones."""
        if not refs:
            return
        with self._lock:
            self._acks[:0] = refs
            self._acks_since = self._acks_since or time.monotonic()

    @contextlib.contextmanager
    def _carrying_acks(self, older_than: float = 0.0) -> Iterator[list[ClaimRef]]:
        """The buffered acks (once the oldest has waited ``older_than`` s), taken
        for one write: put back should it fail, and waited for by a closing
        channel meanwhile."""
        refs = self._take_acks(older_than, carry=True)
        if not refs:
            yield refs
            return
        try:
            yield refs
        except BaseException:
            self._return_acks(refs)
            raise
        finally:
            with self._lock:
                self._carrying -= 1
                self._carried.notify_all()

    def flush_acks(self, *, older_than: float = 0.0) -> None:
        """Write the buffered acks in one transaction (only once the oldest has
        waited ``older_than`` seconds)."""
        with self._carrying_acks(older_than) as refs:
            if not refs:
                return
            outcomes = self.store.ack(refs)
        self._warn_stale(outcomes, "ack")

    def flush_acks_at_close(self) -> None:
        """Write the buffered acks as the channel closes; leave those it cannot
        write (the database is away) to the next channel on the same store.

        Celery closes the consuming channel first, whatever the claimer is doing:
        acks a round in flight took from the buffer come back to it should the
        round fail, so wait for it (bounded: a database that no longer answers
        must not hold a reconnect for ever)."""
        with self._lock:
            self._carried.wait_for(lambda: not self._carrying, timeout=CLOSE_WAIT_SECONDS)
        try:
            self.flush_acks()
            return
        except Exception as exc:
            error = exc
        left = self._take_acks()
        if left:
            leave_acks(self.store, left)
            logger.warning(
                "could not write %d ack(s) as the channel closed (%s): the next "
                "connection writes them", len(left), error,
            )

    def _warn_stale(self, outcomes: Mapping[str, Outcome], what: str) -> None:
        """Say which claims were fenced out -- once per delivery, whatever asks next."""
        with self._lock:
            stale = [
                d for d, o in outcomes.items()
                if o is Outcome.STALE and d not in self._reported_stale
            ]
            if len(self._reported_stale) > 10_000:  # a bound, not a history
                self._reported_stale.clear()
            self._reported_stale.update(stale)
            settled = [d for d, o in outcomes.items() if o is Outcome.DONE]
            self._reported_stale.difference_update(settled)
        if stale:
            _stale_warning(what, stale)

    # -- leases (keeper thread) ------------------------------------------------

    def renew_leases(self) -> None:
        """Extend the leases of held messages that are past half their lease."""
        lease = self.channel.visibility_timeout
        now = time.monotonic()
        with self._lock:
            due = [(tag, ref) for tag, (ref, renew_at) in self._held.items() if renew_at <= now]
        if not due:
            return
        outcomes = self.store.renew([ref for _, ref in due], lease)
        with self._lock:
            for tag, ref in due:
                if tag not in self._held:
                    continue  # settled meanwhile: no longer held, keep it out
                # A lease taken over is not asked for again while its task runs.
                done = outcomes.get(ref.delivery) is Outcome.DONE
                self._held[tag] = (ref, now + lease / 2 if done else math.inf)
        self._warn_stale(outcomes, "lease renewal")


#: Per thread: the dead-letter rejects held back while a message is handed over.
_handing_over = threading.local()


@contextlib.contextmanager
def handing_over() -> Iterator[None]:
    """Hand one message to its consumer: dead-letter rejects made meanwhile, on
    this thread, are written when the consumer's callback returns.

    Celery's worker, given a task it does not know (or cannot decode), rejects
    the message and *then* records the task's ``FAILURE`` (``NotRegistered``).
    Written in that order, a result waiter could wake on the dead letter's own
    ``FAILURE`` (``TaskDeadLettered``) before the worker's verdict commits, or
    not, depending on timing.  Held back, the worker's verdict always comes
    first and the dead letter keeps it: one outcome.
    """
    if getattr(_handing_over, "rejects", None) is not None:  # already handing over
        yield
        return
    _handing_over.rejects = []
    try:
        yield
    finally:
        held_back, _handing_over.rejects = _handing_over.rejects, None
        errors = []
        for qos, refs in held_back:
            try:
                qos.write_reject(refs, requeue=False)
            except Exception as exc:  # noqa: BLE001 - the rest are still written
                errors.append(exc)
        if errors:
            raise errors[0]


class Poller:
    """Drives one transport's consumers from the worker's event loop (the hub).

    Wake-ups -- the listener's, the safety-net poll's -- become claim requests
    to the :class:`Claimer` thread, so the loop keeps feeding the pool while the
    database answers, as it does with Redis' asynchronous BRPOP.  A byte on the
    claimer's pipe brings the loop back to deliver what a claim brought.  Which
    channel may claim, and how much, is its QoS's call.  Every method runs on
    the loop's thread.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.claimer = Claimer()
        self._hub: Any = None
        self._readers: list[int] = []
        self._timers: list[Any] = []
        #: The hub timer set for the next ETA, and when (time.monotonic()) it fires.
        self._due_timer: Any = None
        self._due_at: float | None = None

    def register(self, hub: Any) -> None:
        self._hub = hub
        listener = self.transport.listener
        fd = listener.fileno()
        if fd is not None:
            self._add_reader(fd, self.on_readable)
        else:
            self._call_repeatedly(self.transport.listener_poll_interval, self.on_readable)
        if not self.claimer.is_alive():
            self.claimer.start()
        self._add_reader(self.claimer.fileno(), self.on_claimed)
        hub.on_tick.add(self.on_tick)
        self._call_repeatedly(self.transport.polling_interval, self.on_wake)
        # Messages published before we listened sent their wake-up to no one.
        hub.call_soon(self.on_wake)
        self._arm()

    def _add_reader(self, fd: int, callback: Any) -> None:
        self._hub.add_reader(fd, callback)
        self._readers.append(fd)

    def _call_repeatedly(self, seconds: float, callback: Any) -> None:
        self._timers.append(self._hub.call_repeatedly(seconds, callback))

    def close(self) -> None:
        """Leave the loop and stop the claimer, which gives back what it
        claimed and did not deliver."""
        if self._hub is not None:
            self._hub.on_tick.discard(self.on_tick)
            for fd in self._readers:
                self._hub.remove_reader(fd)
            for timer in self._timers:
                timer.cancel()
            self._disarm()
        self._readers.clear()
        self._timers.clear()
        self.claimer.stop()

    def on_wake(self, woken: Iterable[str] = (ANY_QUEUE,)) -> None:
        """Messages may be ready in ``woken`` queues: claim for the channels
        that consume them (and for those that know a backlog waits)."""
        woken = set(woken)
        logger.debug("woken for %s", woken)
        for channel in list(self.transport.channels):
            queues = channel.consuming_queues()
            if queues and (
                ANY_QUEUE in woken or woken.intersection(queues) or channel.qos.maybe_more
            ):
                self._claim(channel, queues)

    def on_readable(self) -> None:
        woken = self.transport.listener.poll()
        if woken:
            self.on_wake(woken)

    def on_claimed(self) -> None:
        """Deliver what the finished claims brought, then claim again where due."""
        error: BaseException | None = None
        for channel, outcome in self.claimer.take_done():
            if isinstance(outcome, BaseException):
                logger.debug("claim failed: %r", outcome)
                channel.qos.claim_failed()
                error = outcome
            elif channel in self.transport.channels:
                logger.debug("claim brought %d message(s)", len(outcome))
                channel.qos.claim_done(len(outcome))
                channel.deliver(outcome)
            else:
                channel.qos.give_back(outcome)
        if error is not None:
            raise error  # a connection error: the consumer reconnects
        self.on_tick()
        self._arm()

    def on_due(self) -> None:
        """The timer of the next ETA fired: claim for the channels it is due for."""
        self._due_timer = self._due_at = None
        for channel in list(self.transport.channels):
            queues = channel.consuming_queues()
            if channel._qos is not None and channel._qos.due_now() and queues:
                self._claim(channel, queues)
        self._arm()

    def _arm(self) -> None:
        """Set the hub's timer for the earliest ETA the channels know of, not the
        next poll: a claim that came back short looked it up, so a publish with an
        earlier ETA (its wake-up brings such a claim) moves the timer forward."""
        # A channel without a QoS yet never claimed (producers): it knows no ETA.
        qoses = [c._qos for c in list(self.transport.channels) if c._qos is not None]
        due = min((d for q in qoses if (d := q.next_due()) is not None), default=None)
        if due == self._due_at:
            return
        self._disarm()
        if due is not None and self._hub is not None:
            self._due_timer = self._hub.call_at(due, self.on_due)
            self._due_at = due

    def _disarm(self) -> None:
        if self._due_timer is not None:
            self._due_timer.cancel()
        self._due_timer = self._due_at = None

    def on_tick(self) -> None:
        for channel in list(self.transport.channels):
            queues = channel.consuming_queues()
            if queues and channel.qos.claim_due():
                self._claim(channel, queues)

    def _claim(self, channel: Channel, queues: list[str]) -> None:
        limit = channel.qos.reserve()
        if not limit:
            logger.debug("no claim now (one in flight, or no credit): remembered")
        elif not self.claimer.request(channel, queues, limit):
            channel.qos.claim_failed()  # the claimer stopped: the transport is closing
        else:
            logger.debug("claim of up to %d asked from %s", limit, queues)


class Claimer(threading.Thread):
    """Runs the channels' claims (with their buffered acks) off the event loop's
    thread, one at a time, in the order asked.

    Finished claims wait in ``_done`` and a byte on a pipe wakes the loop, which
    takes them.  The claimed messages are held by their channel's QoS from the
    start, so their leases are renewed; a claim that ends after :meth:`stop`
    is given back.
    """

    def __init__(self) -> None:
        super().__init__(name="celery-eventstore-claimer", daemon=True)
        self._cond = threading.Condition()
        self._requests: deque[tuple[Channel, list[str], int]] = deque()
        self._done: list[tuple[Channel, Batch | BaseException]] = []
        self._stopped = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def fileno(self) -> int:
        return self._wake_r

    def request(self, channel: Channel, queues: list[str], limit: int) -> bool:
        """Queue a claim; False once stopped."""
        with self._cond:
            if self._stopped:
                return False
            self._requests.append((channel, queues, limit))
            self._cond.notify()
            return True

    def take_done(self) -> list[tuple[Channel, Batch | BaseException]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._cond:
            done, self._done = self._done, []
        return done

    def run(self) -> None:
        while (request := self._next_request()) is not None:
            channel, queues, limit = request
            outcome: Batch | BaseException
            try:
                outcome = channel.claim(queues, limit)
            except BaseException as exc:  # reported on the loop, which reconnects
                outcome = exc
            if not self._report(channel, outcome):
                if not isinstance(outcome, BaseException):
                    channel.qos.give_back(outcome)
                return

    def _next_request(self) -> tuple[Channel, list[str], int] | None:
        with self._cond:
            while not self._requests and not self._stopped:
                self._cond.wait()
            return None if self._stopped else self._requests.popleft()

    def _report(self, channel: Channel, outcome: Batch | BaseException) -> bool:
        with self._cond:
            if self._stopped:
                return False
            self._done.append((channel, outcome))
            # Under the lock: stop() closes the pipe under it too.
            os.write(self._wake_w, b"\0")
            return True

    def stop(self) -> None:
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._requests.clear()
            self._cond.notify()
            done, self._done = self._done, []
            os.close(self._wake_w)
            os.close(self._wake_r)
        for channel, outcome in done:
            if not isinstance(outcome, BaseException):
                channel.qos.give_back(outcome)
        # The round in flight gives back what it claims once it sees the stop:
        # wait for it, so that happens before the process may exit.  (Its acks
        # are the closing channel's to wait for: see QoS.flush_acks_at_close.)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(CLOSE_WAIT_SECONDS)


class Keeper(threading.Thread):
    """Renews leases while tasks run -- even when a task blocks the event loop
    (solo pool) -- writes acks that waited ``ack_flush_interval`` (those made
    on pool threads, or while no claim comes), and sweeps expired transient
    queues."""

    def __init__(self, transport: Transport) -> None:
        super().__init__(name="celery-eventstore-keeper", daemon=True)
        self.transport = transport
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop, once the flush, renewal or sweep in flight is done."""
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(CLOSE_WAIT_SECONDS)

    def run(self) -> None:
        last_renew = last_sweep = time.monotonic()
        intervals = [c.ack_flush_interval for c in self.transport.channels]
        interval = min(intervals or [self.transport.Channel.ack_flush_interval])
        while not self._stopped.wait(max(interval / 2, 0.01)):
            now = time.monotonic()
            renew = now - last_renew >= RENEW_INTERVAL
            try:
                for channel in list(self.transport.channels):
                    # Only the consuming thread makes a channel's QoS (kombu makes
                    # it on first use): a channel without one holds nothing yet.
                    qos = channel._qos
                    if qos is None:
                        continue
                    qos.flush_acks(older_than=channel.ack_flush_interval)
                    if renew:
                        qos.renew_leases()  # only those past half their lease
                if renew:
                    last_renew = now
                if now - last_sweep >= SWEEP_INTERVAL:
                    last_sweep = now
                    self.transport.store.sweep()
            except Exception as exc:  # the consumer sees the same fault and reconnects
                logger.warning("event store keeper: %s", exc)


def _stale_warning(what: str, stale: Sequence[str]) -> None:
    logger.warning(
        "%s of %d message(s) came too late: the lease ran out and the message was "
        "claimed again or settled (%s)", what, len(stale), ", ".join(stale[:5]),
    )
