"""Registers the ``eventstore`` transport alias with kombu, importing nothing heavy.

kombu has no entry-point group for transports.  This module is loaded through a
``kombu.serializers`` entry point, which kombu loads in every process that
imports it (every Celery app, worker and producer alike), so
``broker_url = "eventstore+..."`` works without an import in the user's code.
The entry point's value is ``REGISTRATION``: kombu registers it as a serializer
that has no encoder and no decoder, i.e. nothing.
"""

from __future__ import annotations

TRANSPORT = "celery_eventstore.transport:Transport"


def register() -> None:
    try:
        from kombu.transport import TRANSPORT_ALIASES
    except ImportError:  # pragma: no cover - kombu is a dependency
        return
    TRANSPORT_ALIASES.setdefault("eventstore", TRANSPORT)


register()

#: (encoder, decoder, content_type, content_encoding) for kombu's registry.
REGISTRATION = (None, None, "application/x-celery-eventstore-unused", "utf-8")
