"""A small Django project for the framework tests (``celery -A shop worker``).

Everything it connects to comes from the environment, so the tests can point it at
a SQLite file or a PostgreSQL schema:

* ``SHOP_DATABASE``: JSON of Django's ``DATABASES["default"]``;
* ``SHOP_AUTOMATIC``: ``1`` puts ``celery_eventstore.contrib.django`` in
  ``INSTALLED_APPS`` (automatic atomic enqueue);
* ``SHOP_DJANGO_DRIVER``: ``psycopg2`` hides psycopg 3, which Django would otherwise
  prefer, so both of Django's PostgreSQL drivers can be tested;
* the acceptance harness's broker, transport options and marker directory.
"""

import os
import sys

if os.environ.get("SHOP_DJANGO_DRIVER") == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]

from .celery import app as celery_app  # noqa: E402 - as Celery's Django guide has it

__all__ = ["celery_app"]
