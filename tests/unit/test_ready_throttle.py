"""The "ready" NOTIFY throttle on its own: what a window holds back is sent once,
when it closes, unless a later commit's own NOTIFY already covers it."""

from __future__ import annotations

import threading
import time

from celery_eventstore.storage.notifiers import ReadyThrottle


class Flushes:
    def __init__(self) -> None:
        self.sent: list[set[str]] = []
        self.done = threading.Event()

    def __call__(self, queues: set[str]) -> None:
        self.sent.append(queues)
        self.done.set()


def test_the_first_publish_of_a_window_notifies_at_once_the_rest_once_after() -> None:
    flushes = Flushes()
    throttle = ReadyThrottle(flushes, window=0.05)
    assert throttle.now(["a", "b"]) == ({"a", "b"}, set())
    for _ in range(100):
        send, hold = throttle.now(["a"])
        assert (send, hold) == (set(), {"a"})
        throttle.later(hold)  # the transaction committed
    assert flushes.done.wait(2)
    assert flushes.sent == [{"a"}]


def test_a_held_queue_covered_by_a_later_commits_notify_is_not_sent_again() -> None:
    flushes = Flushes()
    throttle = ReadyThrottle(flushes, window=0.2)
    throttle.now(["a", "b"])
    _, hold = throttle.now(["a", "b"])
    throttle.later(hold)
    # A transaction decided after those committed notifies "a" itself (its window
    # was reopened by hand here): only "b" is still owed.
    throttle._sent["a"] = -1e9
    assert throttle.now(["a"]) == ({"a"}, set())
    assert flushes.done.wait(2)
    assert flushes.sent == [{"b"}]


def test_one_sender_thread_sends_every_windows_held_wake_ups() -> None:
    senders: list[threading.Thread] = []
    flushed = threading.Semaphore(0)

    def flush(queues: set[str]) -> None:
        senders.append(threading.current_thread())
        flushed.release()

    throttle = ReadyThrottle(flush, window=0.02)
    for _ in range(3):
        throttle._sent.clear()  # a window opens
        assert throttle.now(["a"]) == ({"a"}, set())
        _, hold = throttle.now(["a"])
        throttle.later(hold)
        assert flushed.acquire(timeout=2)
    assert len(senders) == 3 and len(set(senders)) == 1
    assert senders[0] is not threading.current_thread()


def test_a_publish_after_a_pause_notifies_at_once_inside_the_window() -> None:
    """A caller that waits for each task before publishing the next is no burst:
    its publishes are each notified at once, not paced at one per window."""
    flushes = Flushes()
    throttle = ReadyThrottle(flushes, window=10.0, burst_gap=0.05)
    assert throttle.now(["a"]) == ({"a"}, set())
    for _ in range(3):
        time.sleep(0.06)  # the task ran, its result came back: the next publish
        assert throttle.now(["a"]) == ({"a"}, set())
    # A burst inside the same window is still held back.
    assert throttle.now(["a"]) == (set(), {"a"})


def test_close_sends_what_is_owed_ends_the_sender_and_a_later_hold_starts_another() -> None:
    flushes = Flushes()
    throttle = ReadyThrottle(flushes, window=60.0, burst_gap=60.0)  # every later one held
    throttle.now(["a"])
    _, hold = throttle.now(["a"])
    throttle.later(hold)
    sender = throttle._sender
    assert sender is not None and sender.is_alive()
    throttle.close()
    assert flushes.sent == [{"a"}], "close did not send the held wake-up"
    assert not sender.is_alive(), "the sender outlived close()"
    # A store used again after close holds and sends as before.
    throttle._sent["b"] = time.monotonic()
    throttle._published["b"] = time.monotonic()
    throttle.window = 0.05
    _, hold = throttle.now(["b"])
    assert hold == {"b"}
    throttle.later(hold)
    deadline = time.monotonic() + 2
    while len(flushes.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flushes.sent == [{"a"}, {"b"}]
    throttle.close()
