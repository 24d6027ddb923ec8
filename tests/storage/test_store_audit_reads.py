"""Store reads and hooks added for auditing and monitoring (issue 14), on every
dialect: held ETA messages, task names, dry-run prune, the commit hook."""

from __future__ import annotations

import pytest
from storehelpers import FakeClock, make_factory

from celery_eventstore import lifecycle as lc
from celery_eventstore.storage import NewMessage


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(db, clock):
    factory = make_factory(db)
    yield next(factory)(clock=clock)
    next(factory, None)


def publish(store, stream, queue="q", **kw):
    store.publish([NewMessage(stream=stream, queue=queue, message={"body": stream},
                              metadata={"task": f"proj.{stream}"}, **kw)])


def test_scheduled_lists_held_messages_of_the_queues_soonest_first(store, clock):
    publish(store, "later", not_before=clock.now + 20)
    publish(store, "sooner", not_before=clock.now + 10)
    publish(store, "now")
    publish(store, "elsewhere", queue="other", not_before=clock.now + 10)
    held = store.scheduled(["q"])
    assert [(m.stream, m.not_before) for m in held] == [
        ("sooner", clock.now + 10), ("later", clock.now + 20)
    ]
    assert held[0].message == {"body": "sooner"} and held[0].queue == "q"
    clock.advance(15)
    assert [m.stream for m in store.scheduled(["q", "other"])] == ["later"]
    assert store.scheduled([]) == []


def test_task_names_come_from_the_first_publish(store):
    publish(store, "a")
    publish(store, "b")
    store.publish([NewMessage(stream="anon", queue="q", message={})])
    assert store.task_names(["a", "b", "anon", "missing"]) == {"a": "proj.a", "b": "proj.b"}


def test_prune_dry_run_deletes_nothing(store, clock):
    publish(store, "done")
    (claimed,) = store.claim(["q"], 1, "w", 30)
    store.ack([claimed.ref])
    clock.advance(100)
    assert store.prune(before=clock.now, dry_run=True) == 1
    assert store.read_stream("done")
    assert store.prune(before=clock.now) == 1
    assert store.read_stream("done") == []


def test_watchers_hear_of_committed_transactions_only(store):
    heard = []
    store.watch(heard.append)
    store.watch(heard.append)  # once is enough
    publish(store, "a")
    assert [[r.type for r in batch] for batch in heard] == [["Published"]]
    heard.clear()
    with pytest.raises(RuntimeError), store.transaction() as conn:
        publish_in = NewMessage(stream="b", queue="q", message={})
        store.publish([publish_in], connection=conn)
        raise RuntimeError("the caller rolls back")
    store.revoke("a", "customer cancelled")
    assert [[r.type for r in batch] for batch in heard] == [["Revoked", "Discarded"]]
    revoked = heard[0][0].event
    assert isinstance(revoked, lc.Revoked) and revoked.reason == "customer cancelled"


def test_a_failing_watcher_does_not_fail_the_write(store):
    def broken(batch):
        raise ValueError("monitor down")

    store.watch(broken)
    publish(store, "a")
    assert [r.type for r in store.read_stream("a")] == ["Published"]
