"""The claim a message is delivered under travels to the result backend in a
message header: the transport writes it, the backend reads it off the request."""

from __future__ import annotations

from celery.app.task import Context

from celery_eventstore import backend, transport


def test_each_delivery_names_its_claim_in_a_header() -> None:
    stored = {"headers": {"id": "t1", "task": "x"}, "properties": {"delivery_tag": "k"}}
    payload = transport._for_delivery(stored, "claim-2", True)
    assert payload["headers"] == {"id": "t1", "task": "x", backend.CLAIM_HEADER: "claim-2"}
    assert payload["properties"]["delivery_tag"] == "claim-2"
    assert stored["headers"] == {"id": "t1", "task": "x"}  # the stored message is kept
    # A message redelivered under a new claim (or re-published by retry() with the
    # old header copied) carries the new claim.
    again = transport._for_delivery(payload, "claim-3", True)
    assert again["headers"][backend.CLAIM_HEADER] == "claim-3"


def test_other_messages_keep_the_headers_they_were_published_with() -> None:
    """A plain kombu message is not a task: nothing reads the claim there."""
    assert transport._for_delivery({"headers": {"k1": "v1"}}, "c", False)["headers"] == {
        "k1": "v1"
    }
    assert "headers" not in transport._for_delivery({}, "c", False)


def test_the_backend_reads_the_claim_of_the_requests_own_task() -> None:
    request = Context({"id": "t1", backend.CLAIM_HEADER: "c1"})
    assert backend._claim_of(request, "t1") == "c1"
    # A chain's other tasks' results are written with this request: not their claim.
    assert backend._claim_of(request, "t2") is None
    assert backend._claim_of(Context({"id": "t1"}), "t1") is None  # another broker
    assert backend._claim_of(None, "t1") is None  # mark_as_done, eager calls


def test_a_task_delivery_hands_its_claims_state_to_the_pool_in_a_property() -> None:
    """The claim's state goes in a property: Celery passes properties to the pool
    process on the request, and a retry copies headers, never properties."""
    stored = {"headers": {"id": "t1", "task": "x"}, "properties": {}}
    given = ("store-identity", object())
    payload = transport._for_delivery(stored, "claim-2", False, given)
    assert payload["properties"][backend.CLAIM_STATE] is given
    assert backend.CLAIM_STATE not in payload["headers"]
    assert stored["properties"] == {}  # the stored message is kept
    plain = transport._for_delivery({"headers": {"k": "v"}}, "c", False, given)
    assert backend.CLAIM_STATE not in plain["properties"]  # not a task: no result
    ignored = {"headers": {"id": "t2", "task": "x", "ignore_result": True}}
    unpickled = transport._for_delivery(ignored, "c", False, given)
    assert backend.CLAIM_STATE not in unpickled["properties"]  # no result to write
