"""One delivery (one published message of a task) and who moves it between states.

::

    from     to         command             who
    -------  ---------  ------------------  -------------------------------------------
    -        ready      Publish             a producer (scheduled until ``not_before``)
    ready    claimed    Claim               a consumer
    claimed  claimed    Renew               the claim's holder: its lease is extended
    claimed  acked      Ack                 the claim's holder
    claimed  ready      Reject(requeue)     the claim's holder (after ``countdown``): a
                                            run lost, as a lease running out is
    claimed  ready      Restore             the claim's holder, shutting down (a run
                                            lost if the task had started)
    claimed  dead       Reject(no requeue)  the claim's holder
    claimed  ready      Claim               the next consumer, finding the lease run out
    ready    dead       Claim               the next consumer, finding ``max_claims``
                                            runs lost, or ``3 * max_claims``
                                            leases lost before a start
    ready    discarded  Claim               the next consumer, finding it expired, or
                                            claimed before and its task's outcome
                                            recorded since
    claimed  discarded  Reject(requeue),    the claim's holder, when its task's outcome
                        Restore             is recorded since the claim
    ready    discarded  Revoke              whoever revokes the task (a revoke broadcast,
                                            the backend, the CLI)
    ready    discarded  Discard             a queue purge or deletion

``acked``, ``dead`` and ``discarded`` are final; an operator retrying a dead
letter publishes it again as a new delivery (``Publish(retry_of=...)``).  Once
the task is revoked, a delivery given back or found with its lease run out is
discarded rather than made ready; so is one whose task's final outcome was recorded
since it was claimed (the worker died after recording it, before its ack).
Renewals and outcomes are fenced to the current claim: a holder whose lease ran
out and was claimed again is refused
(:class:`~celery_eventstore.exceptions.StaleClaim`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DeliveryStatus(str, Enum):
    READY = "ready"  # waiting; "scheduled" while now < not_before
    CLAIMED = "claimed"
    ACKED = "acked"
    DEAD = "dead"
    DISCARDED = "discarded"

    @property
    def is_final(self) -> bool:
        return self in (DeliveryStatus.ACKED, DeliveryStatus.DEAD, DeliveryStatus.DISCARDED)


@dataclass(frozen=True)
class Delivery:
    """One published message of a task, as far as the log tells."""

    id: str
    queue: str
    priority: int
    not_before: float | None
    expires: float | None
    status: DeliveryStatus = DeliveryStatus.READY
    claim: str | None = None
    consumer: str | None = None
    lease_until: float | None = None
    #: The id of every claim it had, oldest first: the last one is the current
    #: claim while it is claimed, and the one that settled it after.
    claim_ids: tuple[str, ...] = ()
    #: The stream version of its last ``Claimed`` (0: never claimed).
    claimed_version: int = 0
    #: Whether the current claim saw its task start (a result event followed it).
    started: bool = False
    #: Runs that ended without an outcome: a lease that ran out after the task
    #: started, a requeue, a restore after the task started.  Spends ``max_claims``.
    lost_claims: int = 0
    #: Leases that ran out before the task started (prefetched beside a task that
    #: killed the worker).  Spends a larger budget, so they are not the suspect.
    lost_unstarted: int = 0
    reason: str | None = None  # why it was requeued, dead-lettered or discarded

    @property
    def claims(self) -> int:
        """How many times it was claimed."""
        return len(self.claim_ids)

    @property
    def redelivered(self) -> bool:
        """True when a claim before the current (or next) one ended without an ack."""
        earlier = self.claims - 1 if self.status is DeliveryStatus.CLAIMED else self.claims
        return earlier > 0

    def is_due(self, now: float) -> bool:
        return self.not_before is None or self.not_before <= now

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now

    def lease_expired(self, now: float) -> bool:
        return (
            self.status is DeliveryStatus.CLAIMED
            and self.lease_until is not None
            and self.lease_until <= now
        )
