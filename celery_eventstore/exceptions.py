"""Every error this package raises derives from :class:`EventStoreError`.

Each exception's docstring is its default message, so ``raise SchemaMissing()``
already says what went wrong and what to do about it.  Driver errors are
translated into these once, at the storage boundary; no credentials ever reach
a message.
"""

from __future__ import annotations


class EventStoreError(Exception):
    """The celery_eventstore event store reported an error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


# -- the model ---------------------------------------------------------------


class InvalidTransition(EventStoreError):
    """The command is not allowed in the job's current state."""


class UnknownDelivery(InvalidTransition):
    """The stream has no delivery with that id."""


class NotClaimable(InvalidTransition):
    """The delivery cannot be claimed now (claimed, settled, or not yet due)."""


class StaleClaim(InvalidTransition):
    """The claim is no longer the delivery's current one: its outcome was not recorded.

    This happens when the lease ran out and another consumer claimed the delivery,
    or when the delivery was already settled.  Nothing was written.
    """


class CorruptStream(EventStoreError):
    """A stream holds an event sequence the job lifecycle cannot produce."""


class UnreadableStream(CorruptStream):
    """A stream holds a stored event that cannot be read (bad JSON, an unknown
    type, missing fields, a gap in its versions).  Its messages are quarantined as
    dead letters; ``celery-eventstore check`` lists such streams."""

    def __init__(self, stream: str, position: int, reason: str) -> None:
        super().__init__(f"stream {stream!r}: unreadable event at position {position}: {reason}")
        self.stream = stream
        self.position = position
        self.reason = reason


# -- the store ---------------------------------------------------------------


class ConcurrencyConflict(EventStoreError):
    """Another writer appended to the stream first; re-read it and decide again."""


class ConfigurationError(EventStoreError):
    """The event store is misconfigured."""


class InvalidURL(ConfigurationError):
    """The database URL is not a valid SQLAlchemy URL (expected e.g. sqlite:///jobs.db
    or postgresql://user@host/dbname)."""


class UnsupportedDatabase(ConfigurationError):
    """The event store supports PostgreSQL and SQLite only."""


class DatabaseUnavailable(EventStoreError):
    """The database could not be reached; check that it is running and that the URL
    names the right host, port and database."""


class DatabaseError(EventStoreError):
    """The database refused the operation; the message gives the database's reason."""


class SchemaMissing(EventStoreError):
    """The event store's tables do not exist in this database; run
    ``celery-eventstore --url URL migrate`` (or enable auto_migrate)."""


class SchemaOutdated(EventStoreError):
    """The event store's schema is older than this version of celery_eventstore;
    run ``celery-eventstore --url URL migrate``."""


class SchemaTooNew(EventStoreError):
    """The event store's schema is newer than this version of celery_eventstore
    understands; upgrade the package."""


class InvalidName(EventStoreError, ValueError):
    """A name (task id, queue, exchange, routing key...) is longer than the store's
    column for it or contains a NUL character; nothing was written.

    It is a ValueError too: the caller passed a value that can never be stored, and
    retrying cannot help (it is not a connection error, so kombu and Celery do not
    retry the publish).
    """


class MessageTooLarge(EventStoreError):
    """The message is larger than the store's configured ``max_message_size``."""


class UnknownQueue(EventStoreError):
    """No queue by that name is declared."""


class TaskDeadLettered(EventStoreError):
    """The task's message was dead-lettered and will not run again; see
    ``celery-eventstore history TASK_ID`` for why."""
