"""Every command of ``celery-eventstore`` on data a real worker left, on both dialects.

One worker run per dialect (see clidata.py) makes the data; the tests then read it
through ``celery -A cliproj eventstore ...`` subprocesses (the app names the store)
and the stand-alone command run in-process by click's CliRunner.  The tests that
change the store (dead letters, rebuild, prune) come last, in file order, and each
works on its own tasks.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cliproj
import proj
import pytest
import sqlalchemy as sa
from clidata import POISONS, Data, empty_database, make_data, timeline
from harness import reaper_for, wait_for

from celery_eventstore import lifecycle as lc
from celery_eventstore.history import canvas, history
from celery_eventstore.storage import SCHEMA_VERSION, EventStore

TIMEOUT = 30.0
ENTRY_KEYS = {"time", "version", "event", "delivery", "worker", "detail", "stream", "position"}
STATS_KEYS = {
    "queue", "ready", "scheduled", "claimed", "dead", "oldest_seq",
    "oldest_ready_age", "oldest_lease_age",
}  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def data(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Data]:
    url = request.getfixturevalue("postgresql_url") if request.param == "postgresql" else None
    reaper = reaper_for(request, request.param)
    with make_data(request.param, tmp_path_factory.mktemp(f"cli-{request.param}"), url,
                   reaper) as made:  # fmt: skip
        yield made


def _task(data: Data, name: str) -> Any:
    return data.app.tasks[f"cliproj.{name}"]


# -- migrate and check ----------------------------------------------------------------


def test_migrate_is_idempotent_and_prints_sql_that_builds_the_schema(
    data: Data, tmp_path: Path
) -> None:
    assert data.celery("migrate").stdout == f"schema at version {SCHEMA_VERSION} (up to date)\n"
    up_to_date = data.celery("migrate", "--sql").stdout
    assert "nothing to migrate" in up_to_date and "CREATE" not in up_to_date

    with empty_database(data, tmp_path) as target:
        sql = data.cli(*target, "migrate", "--sql").output
        schema = target[3] if len(target) > 2 else None
        for table in ("schema_version", "events", "messages", "dead_letters", "results"):
            assert f"CREATE TABLE {schema + '.' if schema else ''}eventstore_{table} (" in sql
        # Valid SQL: run as printed, it yields a schema the store accepts as current.
        store = EventStore(target[1], schema=schema)
        try:
            assert store.schema_version() == 0
            with store.engine.begin() as conn:
                for statement in sql.split(";\n"):
                    if statement.strip():
                        conn.exec_driver_sql(statement)
            store.check_schema()
            assert store.schema_version() == SCHEMA_VERSION
            assert data.cli(*target, "migrate").output.endswith("(up to date)\n")
        finally:
            store.close()


def test_migrate_creates_a_missing_schema(data: Data, tmp_path: Path) -> None:
    with empty_database(data, tmp_path) as target:
        error = data.cli(*target, "history", data.ids["plain"], code=2)
        assert "do not exist" in error.output
        applied = ", ".join(map(str, range(1, SCHEMA_VERSION + 1)))
        assert data.cli(*target, "migrate").output == (
            f"schema at version {SCHEMA_VERSION} (applied {applied})\n"
        )
        assert data.cli(*target, "queues").output.endswith("no messages\n")


def test_check_reports_schema_wakeups_and_clock_skew(data: Data) -> None:
    lines = data.celery("check").stdout.splitlines()
    # PostgreSQL with autovacuum off gets a warning line (CI's server has it off).
    postgresql = data.broker.dialect == "postgresql"
    autovacuum_off = postgresql and _autovacuum_off(data)
    assert [line.split()[0] for line in lines] == [
        "database", "driver", *(["statements"] if postgresql else []), "schema", "clock",
        "wake-ups", *(["warning"] if autovacuum_off else []),
        "log",
    ]
    if postgresql:  # a connection straight to the server, no prepare_threshold
        assert lines.pop(2) == (
            "statements prepared on the server, each after 5 runs on a connection")
    assert lines[-1] == "log        0 unreadable stream(s)"
    if autovacuum_off:
        assert "autovacuum is off" in lines[5]
    assert data.broker.db_url.split("://")[0].split("+")[0] in lines[0]
    driver = sa.make_url(data.broker.db_url).get_driver_name()
    assert lines[1].split()[:2] == ["driver", driver], lines[1]
    assert lines[2].split() == ["schema", "version", str(SCHEMA_VERSION)]
    skew_ms = float(lines[3].split()[2])
    assert abs(skew_ms) < 60_000, lines[3]  # same machine: any skew is measurement noise
    assert lines[4] == "wake-ups   working"


def _autovacuum_off(data: Data) -> bool:
    engine = sa.create_engine(data.broker.db_url)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SHOW autovacuum").scalar_one() == "off"
    finally:
        engine.dispose()


# -- history ----------------------------------------------------------------------------


def test_history_of_a_plain_task(data: Data) -> None:
    task_id = data.ids["plain"]
    out = data.celery("history", task_id).stdout
    assert out.splitlines()[0] == f"== {task_id}  state=SUCCESS  task=cliproj.add"
    lines = timeline(out)[task_id]
    events = [event for event, _, _ in lines]
    assert sorted(events) == sorted(["Published", "Claimed", "Acked", "Started", "Succeeded"])
    assert events[0] == "Published" and events.index("Started") < events.index("Succeeded")
    assert all(attempt == 1 for _, attempt, _ in lines), lines
    details = dict((event, rest) for event, _, rest in lines)
    assert details["Published"].startswith("queue=celery task=cliproj.add retries=0")
    assert details["Succeeded"] == "result=5"
    # The worker's name on Started, its consumer id on the claim.
    assert details["Started"].startswith(f"by {data.workers[0].name}@")
    assert f":{data.workers[0].proc.pid}:" in details["Claimed"]


def test_history_of_a_retry_chain(data: Data) -> None:
    task_id = data.ids["flaky"]
    out = data.cli("history", task_id).output
    assert out.splitlines()[0] == f"== {task_id}  state=SUCCESS  task=cliproj.flaky"
    lines = timeline(out)[task_id]
    published = [(attempt, rest) for event, attempt, rest in lines if event == "Published"]
    assert [attempt for attempt, _ in published] == [1, 2, 3]
    assert [rest.split()[2] for _, rest in published] == ["retries=0", "retries=1", "retries=2"]
    # A retry waits in the store for its countdown: the history shows its ETA.
    assert all("eta=" in rest for _, rest in published[1:])
    retries = [(attempt, rest) for event, attempt, rest in lines if event == "RetryScheduled"]
    assert retries == [
        (1, "exc=ConnectionError: flaky attempt 1 failed"),
        (2, "exc=ConnectionError: flaky attempt 2 failed"),
    ]
    assert [a for e, a, _ in lines if e == "Started"] == [1, 2, 3]
    assert [(a, r) for e, a, r in lines if e == "Succeeded"] == [(3, "result=ok after 2 retries")]
    assert lines.index(next(x for x in lines if x[0] == "Succeeded")) > lines.index(
        next(x for x in lines if x[0] == "Published" and x[1] == 3)
    )


def test_history_json_has_every_field_of_every_event(data: Data) -> None:
    task_id = data.ids["flaky"]
    document = json.loads(data.cli("history", "--json", task_id).output)
    assert set(document) == {"stream", "events"}
    assert document["stream"] == task_id
    recorded = data.store.read_stream(task_id)
    events = document["events"]
    assert len(events) == len(recorded)
    for item, rec in zip(events, recorded, strict=True):
        assert set(item) == ENTRY_KEYS
        assert (item["stream"], item["position"], item["version"], item["event"]) == (
            task_id, rec.position, rec.version, rec.type,
        )  # fmt: skip
        assert datetime.fromisoformat(item["time"]).timestamp() == pytest.approx(
            rec.recorded_at, abs=0.001
        )
        assert isinstance(item["detail"], dict)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for item in events:
        by_type.setdefault(item["event"], []).append(item)
    assert [p["delivery"] for p in by_type["Published"]] == [1, 2, 3]
    assert [p["detail"]["retries"] for p in by_type["Published"]] == [0, 1, 2]
    assert [p["detail"]["queue"] for p in by_type["Published"]] == ["celery"] * 3
    assert [(r["delivery"], r["detail"]) for r in by_type["RetryScheduled"]] == [
        (1, {"exc": "ConnectionError: flaky attempt 1 failed"}),
        (2, {"exc": "ConnectionError: flaky attempt 2 failed"}),
    ]
    (succeeded,) = by_type["Succeeded"]
    assert (succeeded["delivery"], succeeded["detail"]) == (3, {"result": "ok after 2 retries"})
    assert all(c["worker"] and c["detail"].keys() == {"lease_until"} for c in by_type["Claimed"])
    assert all(s["worker"].startswith(data.workers[0].name) for s in by_type["Started"])


def test_history_tree_shows_the_whole_chord(data: Data) -> None:
    ids = data.ids
    header = [r.id for r in data.app.GroupResult.restore(ids["group"]).results]
    expected = {*header, ids["chord"], f"group:{ids['group']}", f"chord:{ids['group']}"}

    for start in (ids["chord"], header[1], ids["group"], f"chord:{ids['group']}"):
        out = data.cli("history", "--tree", start).output
        streams = timeline(out)
        assert set(streams) == expected, start
    assert [e for e, _, _ in streams[f"chord:{ids['group']}"]] == [
        "ChordPartDone", "ChordPartDone", "ChordPartDone", "ChordCompleted",
    ]  # fmt: skip
    callback = streams[ids["chord"]]
    assert ("Succeeded", 1, "result=6") in callback
    headers = {line.split()[1]: line for line in out.splitlines() if line.startswith("== ")}
    assert headers[f"chord:{ids['group']}"].endswith("state=completed")
    assert headers[f"group:{ids['group']}"].endswith("state=saved")
    assert f"group={ids['group']}" in headers[header[0]]

    documents = json.loads(data.cli("history", "--tree", "--json", ids["chord"]).output)
    assert isinstance(documents, list)
    assert {d["stream"] for d in documents} == expected
    assert all(set(e) == ENTRY_KEYS for d in documents for e in d["events"])
    # A task outside any canvas is its own tree.
    assert set(timeline(data.cli("history", "--tree", ids["plain"]).output)) == {ids["plain"]}


def test_history_of_a_group_id_and_of_an_unknown_task(data: Data) -> None:
    gid = data.ids["group"]
    assert set(timeline(data.cli("history", gid).output)) == {f"group:{gid}", f"chord:{gid}"}
    missing = data.cli("history", "no-such-task", code=1)
    assert "no events for 'no-such-task'" in missing.output


def test_history_shows_arguments_eta_expiry_and_each_failure(data: Data) -> None:
    ids = data.ids
    failed = timeline(data.cli("history", ids["failed"]).output)[ids["failed"]]
    details = {event: rest for event, _, rest in failed}
    published = details["Published"]
    assert published.startswith("queue=celery task=cliproj.fail retries=0 ")
    assert "args=('no such customer',) kwargs={}" in published
    assert "expires=" in published and "eta=" not in published
    assert details["Failed"] == "exc=ValueError: no such customer"
    eta = {e: r for e, _, r in timeline(data.cli("history", ids["eta"]).output)[ids["eta"]]}
    assert "args=(1, 1)" in eta["Published"] and "eta=" in eta["Published"]
    document = json.loads(data.cli("history", "--json", ids["failed"]).output)
    detail = document["events"][0]["detail"]
    assert datetime.fromisoformat(detail["expires"]).tzinfo is not None
    assert (detail["args"], detail["kwargs"]) == ("('no such customer',)", "{}")

    # Each ChordPartDone names the header task it counted.
    header = [r.id for r in data.app.GroupResult.restore(ids["group"]).results]
    chord_stream = f"chord:{ids['group']}"
    parts = timeline(data.cli("history", chord_stream).output)[chord_stream]
    counted = [rest for event, _, rest in parts if event == "ChordPartDone"]
    assert sorted(counted) == sorted(f"task_id={h} state=SUCCESS" for h in header)


def test_history_of_a_group_that_was_never_saved_shows_its_members(data: Data) -> None:
    gid, members = data.ids["plain_group"], data.ids["plain_group_members"].split(",")
    assert data.store.read_stream(f"group:{gid}") == []  # never saved
    streams = timeline(data.cli("history", gid).output)
    assert list(streams) == members  # oldest first
    documents = json.loads(data.cli("history", "--json", gid).output)
    assert [d["stream"] for d in documents] == members


# -- tasks -------------------------------------------------------------------------------


def _listed(output: str) -> list[str]:
    return [line.split()[0] for line in output.splitlines()]


def test_tasks_finds_tasks_by_each_field_newest_first(data: Data) -> None:
    ids = data.ids
    everything = [t.task_id for t in data.store.tasks(limit=1000)]
    assert _listed(data.celery("tasks", "--limit", "1000").stdout) == everything
    assert _listed(data.cli("tasks", "--limit", "3").output) == everything[:3]
    adds = _listed(data.cli("tasks", "--name", "cliproj.add", "--limit", "100").output)
    assert ids["plain"] in adds and ids["flaky"] not in adds
    assert adds == [t for t in everything if data.store.task_summaries([t])[t].name
                    == "cliproj.add"]
    assert _listed(data.cli("tasks", "--state", "failure").output) == [
        t for t in everything if t in {ids["failed"], *(ids[f"poison_{n}"] for n in POISONS)}
        and data.store.task_summaries([t])[t].state == "FAILURE"
    ]
    assert ids["failed"] in _listed(data.cli("tasks", "--state", "FAILURE").output)
    assert _listed(data.cli("tasks", "--queue", cliproj.IDLE_QUEUE).output) == [ids["idle"]]
    assert sorted(_listed(data.cli("tasks", "--group", ids["plain_group"]).output)) == sorted(
        ids["plain_group_members"].split(",")
    )
    worker = data.store.task_summaries([ids["plain"]])[ids["plain"]].worker
    assert worker and worker.startswith(data.workers[0].name)
    assert ids["plain"] in _listed(data.cli("tasks", "--worker", worker).output)
    assert data.cli("tasks", "--since", "2099-01-01").output == "no tasks\n"
    assert _listed(data.cli("tasks", "--since", "1h", "--until", "2099-01-01T00:00",
                            "--limit", "1000").output) == everything
    assert data.cli("tasks", "--until", "1d").output == "no tasks\n"
    line = next(x for x in data.cli("tasks", "--limit", "1000").output.splitlines()
                if x.startswith(ids["plain"]))
    assert line.split()[2:] == ["SUCCESS", "cliproj.add", "queue=celery", f"worker={worker}"]
    bad = data.cli("tasks", "--since", "yesterday", code=2).output
    assert "neither an ISO time" in bad


def test_json_outputs_give_times_in_iso_8601(data: Data) -> None:
    listed = json.loads(data.cli("tasks", "--json", "--name", "cliproj.fail").output)
    assert [t["task_id"] for t in listed] == [data.ids["failed"]]
    assert set(listed[0]) == {
        "task_id", "name", "state", "queue", "worker", "parent_id", "root_id", "group_id",
        "created_at",
    }
    created = data.store.task_summaries([data.ids["failed"]])[data.ids["failed"]].created_at
    assert datetime.fromisoformat(listed[0]["created_at"]).timestamp() == pytest.approx(
        created, abs=0.001
    )
    letters = json.loads(data.cli("dead", "--json").output)
    assert letters and all(datetime.fromisoformat(d["dead_at"]).tzinfo for d in letters)
    for line in data.cli("tail", "--json", "-n", "5").output.splitlines():
        item = json.loads(line)
        assert set(item) == ENTRY_KEYS
        assert datetime.fromisoformat(item["time"]).tzinfo is not None


# -- tail --------------------------------------------------------------------------------


def _tail_streams(output: str) -> list[str]:
    return [line.split()[0] for line in output.splitlines()]


def test_tail_filters_by_queue_task_and_event_type(data: Data) -> None:
    ids = data.ids
    idle = data.celery("tail", "--queue", cliproj.IDLE_QUEUE).stdout
    assert _tail_streams(idle) == [ids["idle"]]
    assert "Published" in idle and f"queue={cliproj.IDLE_QUEUE}" in idle

    flaky = data.cli("tail", "-n", "1000", "--task", "cliproj.flaky").output
    assert set(_tail_streams(flaky)) == {ids["flaky"]}
    assert [line.split()[2] for line in flaky.splitlines()] == data.types(ids["flaky"])

    dead = data.cli("tail", "--type", "DeadLettered").output
    poisons = {ids[f"poison_{n}"] for n in ("retry_one", "purge", "retry_all")}
    assert set(_tail_streams(dead)) == poisons
    assert all("reason=rejected by the consumer" in line for line in dead.splitlines())

    last_two = data.cli("tail", "-n", "2").output.splitlines()
    log = data.store.read_all(limit=100_000)
    assert _tail_streams("\n".join(last_two)) == [r.stream for r in log[-2:]]
    # Stream ids are printed whole, so they can be passed to `history`.
    group = data.cli("tail", "-n", "1000", "--type", "GroupSaved").output
    assert _tail_streams(group) == [f"group:{ids['group']}"]


def test_tail_by_time_and_type_in_any_case(data: Data) -> None:
    log = data.store.read_all(limit=100_000)
    middle = log[len(log) // 2].recorded_at
    since = datetime.fromtimestamp(middle, timezone.utc).isoformat()
    cut = datetime.fromisoformat(since).timestamp()  # to the microsecond
    after = data.cli("tail", "--since", since).output.splitlines()
    assert _tail_streams("\n".join(after)) == [r.stream for r in log if r.recorded_at >= cut]
    until = data.cli("tail", "--until", since, "-n", "3").output.splitlines()
    assert _tail_streams("\n".join(until)) == [
        r.stream for r in log if r.recorded_at <= cut
    ][-3:]
    assert data.cli("tail", "--since", "2099-01-01").output == ""
    assert len(data.cli("tail", "--since", "1h", "-n", "4").output.splitlines()) == 4
    failed = data.cli("tail", "--type", "failed", "--type", "RETRYSCHEDULED", "-n", "100")
    assert {line.split()[2] for line in failed.output.splitlines()} == {
        "Failed", "RetryScheduled"
    }
    bad = data.cli("tail", "--type", "Exploded", code=2).output
    assert "'Exploded' is not an event type; one of Acked, " in bad and "DeadLettered" in bad
    assert "--follow cannot stop at --until" in data.cli(
        "tail", "-f", "--until", "1h", code=2
    ).output


def test_tail_starts_at_the_end_of_the_log(data: Data) -> None:
    """``tail`` reads the events it shows from the end of the log, not the log."""
    reads: list[Any] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "eventstore_events" in statement and "LIMIT" in statement.upper():
            reads.append(parameters)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        assert len(data.cli("tail", "-n", "2", "--task", "cliproj.add").output.splitlines()) == 2
        out = data.cli("tail", "-n", "3").output.splitlines()
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)
    assert len(out) == 3 and len(reads) == 2, reads
    assert all(3 in (p.values() if isinstance(p, dict) else p) for p in reads[1:]), reads


def test_tail_follow_prints_new_events_until_interrupted(data: Data) -> None:
    command = [
        sys.executable, "-m", "celery_eventstore.cli", *data.url_args(),
        "tail", "-f", "-n", "1", "--task", "cliproj.add",
    ]  # fmt: skip
    # Interrupted like a terminal would, even when the suite runs in the background
    # (where a shell starts it with SIGINT ignored, and children inherit that).
    def interruptible() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=data.env(),
                            preexec_fn=interruptible)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines, TIMEOUT, "tail to print its backlog line")
        task_id = _task(data, "add").delay(20, 22).id
        wait_for(
            lambda: any(line.startswith(task_id) and "Succeeded" in line for line in lines),
            TIMEOUT, f"tail -f to show {task_id} run by the worker", show=lambda: lines,
        )  # fmt: skip
        _task(data, "flaky").delay(0)  # another task name: filtered out
        later = _task(data, "add").apply_async((1, 2), countdown=3600).id
        wait_for(lambda: any(line.startswith(later) for line in lines),
                 TIMEOUT, "the scheduled add to show", show=lambda: lines)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(TIMEOUT)
        reader.join(TIMEOUT)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    mine = [line.split()[2] for line in lines if line.startswith(task_id)]
    assert mine[0] == "Published" and "Succeeded" in mine
    assert [line.split()[2] for line in lines if line.startswith(later)] == ["Published"]
    assert all("cliproj.flaky" not in line for line in lines)


# -- queues ------------------------------------------------------------------------------


def test_queues_shows_every_state_and_the_ages(data: Data) -> None:
    held = _task(data, "hold").delay().id
    try:
        data.broker.wait_for_event(held, "Started", TIMEOUT)
        claimed_at = next(
            r.recorded_at for r in data.store.read_stream(held) if r.type == "Claimed"
        )
        idle_at = data.store.read_stream(data.ids["idle"])[0].recorded_at
        before = data.store.now()
        table = data.celery("queues").stdout.splitlines()
        stats = {s["queue"]: s for s in json.loads(data.cli("queues", "--json").output)}
        after = data.store.now()
    finally:
        (data.broker.markers / proj.go_file(held)).touch()
    data.broker.wait_for_event(held, "Succeeded", TIMEOUT)
    data.broker.wait_for_event(held, "Acked", TIMEOUT)  # acks_late: after the result

    assert table[0].split() == [
        "queue", "ready", "oldest", "scheduled", "in-flight", "oldest", "dead",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert set(rows) == {"celery", cliproj.IDLE_QUEUE, cliproj.POISON_QUEUE}
    ready, ready_age, scheduled, in_flight, lease_age, dead = rows["celery"]
    # Scheduled: the one due in an hour (and tail -f's, if it ran first).
    assert (ready, ready_age, in_flight, dead) == ("0", "-", "1", "2")
    assert int(scheduled) >= 1 and lease_age.endswith("s")
    assert rows[cliproj.IDLE_QUEUE][:1] + rows[cliproj.IDLE_QUEUE][2:] == [
        "1", "0", "0", "-", "0",
    ]  # fmt: skip
    assert rows[cliproj.POISON_QUEUE] == ["0", "-", "0", "0", "-", "1"]

    assert all(set(s) == STATS_KEYS for s in stats.values())
    celery, idle = stats["celery"], stats[cliproj.IDLE_QUEUE]
    assert (celery["ready"], celery["claimed"], celery["dead"]) == (0, 1, 2)
    assert celery["oldest_ready_age"] is None
    # Ages by the store's clock (the database's on PostgreSQL): allow its measuring noise.
    assert before - claimed_at - 0.5 <= celery["oldest_lease_age"] <= after - claimed_at + 0.5
    assert (idle["ready"], idle["claimed"], idle["oldest_lease_age"]) == (1, 0, None)
    assert before - idle_at - 0.5 <= idle["oldest_ready_age"] <= after - idle_at + 0.5
    published = data.store.read_stream(data.ids["idle"])[0]
    assert idle["oldest_seq"] == published.position


# -- the Python API ---------------------------------------------------------------------


def test_python_api_answers_what_the_commands_print(data: Data) -> None:
    ids = data.ids
    entries = history(data.store, ids["flaky"])
    document = json.loads(data.cli("history", "--json", ids["flaky"]).output)
    assert [e.as_json() for e in entries] == [
        {k: v for k, v in item.items() if k not in ("stream", "position")}
        for item in document["events"]
    ]
    assert [(e.event, e.delivery) for e in entries if e.event == "Succeeded"] == [
        ("Succeeded", 3)
    ]
    assert set(canvas(data.store, ids["chord"])) >= {ids["chord"], f"chord:{ids['group']}"}

    ages = ("oldest_ready_age", "oldest_lease_age")
    printed = json.loads(data.cli("queues", "--json").output)
    stats = data.store.queue_stats()
    assert [s.queue for s in stats] == [p["queue"] for p in printed]
    for s, p in zip(stats, printed, strict=True):
        assert {k: v for k, v in vars(s).items() if k not in ages} == {
            k: v for k, v in p.items() if k not in ages
        }
        for age in ages:  # a moment apart
            assert getattr(s, age) == (None if p[age] is None else pytest.approx(p[age], abs=2))
    letters = data.store.dead_letters()
    printed_letters = json.loads(data.cli("dead", "--json").output)
    names = data.store.task_names(d.stream for d in letters)
    assert [{**p, "dead_at": datetime.fromisoformat(p["dead_at"]).timestamp()}
            for p in printed_letters] == [
        {**vars(d), "dead_at": pytest.approx(d.dead_at, abs=0.001), "task_name": names[d.stream]}
        for d in letters
    ]


# -- revoke ------------------------------------------------------------------------------


def test_revoke_is_durable_across_a_worker_restart(data: Data) -> None:
    task_id = data.ids["revoked"]
    assert data.revoke_run is not None
    assert data.revoke_run.stdout == f"revoked {task_id}: 1 pending deliveries discarded\n"
    events = data.store.read_stream(task_id)
    assert [r.type for r in events] == ["Published", "Revoked", "Discarded"]
    # The worker that was running then is gone; the one started after it was up
    # when the task fell due, and never saw it.
    due = events[0].event.not_before
    assert data.workers[0].proc.poll() is not None and data.worker.proc.poll() is None
    assert data.store.now() > due
    assert data.broker.runs(task_id) == []
    assert task_id not in data.worker.log() and task_id not in data.workers[0].log()
    assert data.app.AsyncResult(task_id).state == "REVOKED"

    out = data.cli("history", task_id).output
    assert out.splitlines()[0].startswith(f"== {task_id}  state=REVOKED")
    assert [(e, a, r) for e, a, r in timeline(out)[task_id][1:]] == [
        ("Revoked", None, "reason=revoked from the command line"),
        ("Discarded", 1, "reason=revoked"),
    ]
    assert data.cli("revoke", task_id).output == f"{task_id} was already revoked\n"


def test_revoke_of_a_scheduled_task_with_a_reason(data: Data) -> None:
    task_id = _task(data, "add").apply_async((3, 3), countdown=3600).id
    out = data.cli("revoke", "--reason", "customer cancelled", task_id).output
    assert out == f"revoked {task_id}: 1 pending deliveries discarded\n"
    assert data.store.read_stream(task_id)[1].event == lc.Revoked("customer cancelled")


# -- dead letters (changes the store) ----------------------------------------------------


def test_dead_letters_listed_retried_and_purged(data: Data) -> None:
    ids = data.ids
    listed = data.celery("dead").stdout.splitlines()
    assert len(listed) == 3
    letters = {d.stream: d for d in data.store.dead_letters()}
    names = data.store.task_names(letters)
    for line in listed:
        delivery, task, stream, queue, _, reason = line.split(maxsplit=5)
        letter = letters[stream.removeprefix("id=")]
        assert (delivery, task, queue, reason) == (
            letter.delivery, f"task={names[letter.stream]}", f"queue={letter.queue}",
            "reason=rejected by the consumer",
        )  # fmt: skip
    assert [d["stream"] for d in json.loads(data.cli("dead", "--json").output)] == [
        line.split()[2].removeprefix("id=") for line in listed
    ]
    poisoned = data.cli("dead", "--queue", cliproj.POISON_QUEUE).output
    assert poisoned.count("\n") == 1 and ids["poison_purge"] in poisoned

    # One by id: a new delivery on the same stream, which the worker runs.
    one = ids["poison_retry_one"]
    old = letters[one].delivery
    (line,) = data.celery("dead", "retry", old).stdout.splitlines()
    assert line.startswith(f"{old} -> ")
    new = line.split()[-1]
    data.broker.wait_for_event(one, "Succeeded", TIMEOUT)
    published = [r for r in data.store.read_stream(one) if r.type == "Published"]
    assert [p.event.delivery for p in published] == [old, new]
    lines = timeline(data.cli("history", one).output)[one]
    # The new delivery keeps what the first publish recorded (task name...).
    republished = [(a, d) for e, a, d in lines if e == "Published" and a == 2]
    assert len(republished) == 1, lines
    assert republished[0][1].startswith("queue=celery task=cliproj.poison retries=0")
    assert republished[0][1].endswith(f"retry_of={old}")
    assert ("Succeeded", 2, "result=cured") in lines

    # Purge one queue's; the history keeps them.
    assert data.cli("dead", "purge", "--queue", cliproj.POISON_QUEUE).output == (
        "purged 1 dead letters\n"
    )
    assert data.types(ids["poison_purge"])[-1] == "DeadLetterPurged"
    # The rest with --all.
    everything = data.cli("dead", "retry", "--all").output.splitlines()
    assert [x.split()[0] for x in everything] == [letters[ids["poison_retry_all"]].delivery]
    data.broker.wait_for_event(ids["poison_retry_all"], "Succeeded", TIMEOUT)
    assert data.cli("dead").output == "no dead letters\n"
    assert data.cli("dead", "purge").output == "purged 0 dead letters\n"
    assert "name a delivery id or pass --all" in data.cli("dead", "retry", code=2).output
    error = data.celery("dead", "retry", "no-such-delivery", check=False)
    assert error.returncode != 0 and "no dead letter 'no-such-delivery'" in error.stderr
    assert "Traceback" not in error.stderr


# -- rebuild and prune (change the store) ------------------------------------------------


def test_rebuild_reproduces_the_projections(data: Data) -> None:
    before = data.store.projection_rows()
    events = len(data.store.read_all(limit=100_000))
    # Piped: the summary alone, no progress bar.
    assert data.celery("rebuild").stdout == f"replayed {events} events\n"
    assert data.store.projection_rows() == before


def test_prune_deletes_whole_finished_streams_and_keeps_unfinished_ones(data: Data) -> None:
    ids = data.ids
    assert data.celery("prune", "--older-than", "1h").stdout == "pruned 0 streams\n"
    kept = [ids["idle"], ids["scheduled"]]
    finished = [ids[k] for k in ("plain", "flaky", "chord", "eta", "revoked", "poison_purge")]
    finished += [f"group:{ids['group']}", f"chord:{ids['group']}"]
    streams = {r.stream for r in data.store.read_all(limit=100_000)}
    pending = {s for s in streams if data.store.load(s).pending()}

    out = data.celery("prune", "--older-than", "0").stdout
    assert out == f"pruned {len(streams - pending)} streams\n"
    assert all(data.store.read_stream(s) == [] for s in finished)
    assert data.store.results(finished) == {}
    assert all(data.store.read_stream(s) for s in kept)
    assert {r.stream for r in data.store.read_all(limit=100_000)} == pending
    assert "no events for" in data.cli("history", ids["plain"], code=1).output
    # The queues still hold what was pending.
    assert {s.queue: s.ready for s in data.store.queue_stats()}[cliproj.IDLE_QUEUE] == 1
