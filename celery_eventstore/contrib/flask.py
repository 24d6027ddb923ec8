"""Atomic enqueue for Flask: every task published while a request is handled joins
the transaction of a SQLAlchemy session (Flask-SQLAlchemy's ``db.session``).

::

    from celery_eventstore.contrib.flask import atomic_requests

    atomic_requests(app, db.session)

It is :func:`celery_eventstore.atomic` opened before each request and closed after
it.  The session is asked for its connection at each publish, so the job is written
in the transaction the request's ``db.session.commit()`` commits; a request that
ends without a commit (an error, or no commit at all) rolls the job back with the
rest of its work.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..enqueue import atomic

__all__ = ["atomic_requests"]

_STACK = "_celery_eventstore_atomic"


def atomic_requests(app: Any, session: Any, celery_app: Any = None) -> None:
    """Bind ``session`` (a Session or scoped session) for every request ``app`` handles.

    ``celery_app`` is the Celery app whose publishes join (default: Celery's
    current app); it must use the eventstore broker.
    """
    from flask import g

    @app.before_request
    def _bind() -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(atomic(session, app=celery_app))
        setattr(g, _STACK, stack)

    @app.teardown_request
    def _unbind(exc: BaseException | None) -> None:
        stack = g.pop(_STACK, None)
        if stack is not None:
            stack.close()
