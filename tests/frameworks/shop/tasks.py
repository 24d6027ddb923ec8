"""The project's task: it records that it ran, and whether its order exists."""

import json
import os

from celery import shared_task


@shared_task(name="shop.receipt")
def receipt(order_id: str) -> None:
    from .models import Order

    line = json.dumps({"order": order_id, "exists": Order.objects.filter(id=order_id).exists()})
    with open(os.path.join(os.environ["ACCEPTANCE_MARKER_DIR"], f"ran-{order_id}"), "a") as out:
        out.write(line + "\n")
