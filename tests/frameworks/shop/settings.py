"""Django settings of the test project (see ``shop/__init__.py``)."""

import json
import os

SECRET_KEY = "framework-tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {"default": json.loads(os.environ["SHOP_DATABASE"])}
if os.environ.get("SHOP_OTHER_DATABASE"):  # a database that is not the broker's
    DATABASES["other"] = {
        "ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["SHOP_OTHER_DATABASE"],
    }

INSTALLED_APPS = ["shop"]
if os.environ.get("SHOP_AUTOMATIC") == "1":
    # [automatic]
    # The one setting that makes every publish inside transaction.atomic() join it.
    INSTALLED_APPS.append("celery_eventstore.contrib.django")
    # [automatic]

CELERY_BROKER_URL = os.environ["ACCEPTANCE_BROKER_URL"]
CELERY_BROKER_TRANSPORT_OPTIONS = json.loads(os.environ["ACCEPTANCE_TRANSPORT_OPTIONS"])
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
