"""Issue 14, items 5 and 9: ``queues --at`` and the CLI papercuts, on both dialects.

The data is written through the store itself (no worker needed): what is tested
is what the commands make of it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from click.testing import CliRunner, Result

from celery_eventstore import lifecycle as lc
from celery_eventstore.cli import eventstore
from celery_eventstore.storage import EventStore, NewMessage


class Cli:
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.options = options
        self.args = ["--url", url] + (["--schema", options["schema"]] if "schema" in options
                                      else [])

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = CliRunner().invoke(eventstore, [*self.args, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    def store(self, *, migrate: bool = True) -> EventStore:
        store = EventStore(self.url, **self.options)
        if migrate:
            store.migrate()
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request: pytest.FixtureRequest) -> Cli:
    url, options = request.getfixturevalue(f"{request.param}_db")
    return Cli(url, options)


def publish(store: EventStore, stream: str, queue: str = "q1", task: str = "proj.add",
            **kw: Any) -> None:
    store.publish([NewMessage(stream=stream, queue=queue, message={"body": stream},
                              metadata={"task": task}, **kw)])


# -- item 9 -------------------------------------------------------------------------


def test_the_missing_schema_error_suggests_a_command_that_works(cli: Cli) -> None:
    result = cli("check", code=2)
    message = result.output
    assert "migrate --url" not in message
    start = message.index("`") + 1
    suggested = message[start:message.index("`", start)]
    assert suggested.startswith("celery-eventstore --url URL")
    assert suggested.endswith(" migrate")
    # Run what it says, with the URL filled in: it works.
    args = suggested.split()[1:]
    args[args.index("URL")] = cli.url
    result = CliRunner().invoke(eventstore, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "schema at version" in result.output
    cli("check")


def test_revoke_of_an_unknown_id_refuses_and_writes_nothing(cli: Cli) -> None:
    store = cli.store()
    publish(store, "known")
    before = store.last_position()
    result = cli("revoke", "no-such-task", code=1)
    assert "unknown task" in result.output and "nothing revoked" in result.output
    assert store.read_stream("no-such-task") == []
    assert store.last_position() == before
    # Meant: --force records it, so a later publish of that id is discarded.
    assert cli("revoke", "no-such-task", "--force").output.startswith("revoked no-such-task")
    publish(store, "no-such-task")
    assert [r.type for r in store.read_stream("no-such-task")] == [
        "Revoked", "Published", "Discarded"
    ]
    # A known task is revoked as before.
    assert cli("revoke", "known").output == "revoked known: 1 pending deliveries discarded\n"
    store.close()


def test_dead_shows_task_names_and_documents_its_options(cli: Cli) -> None:
    store = cli.store()
    publish(store, "t-poison", task="proj.poison")
    (claimed,) = store.claim(["q1"], 1, "w1", 30)
    store.reject([claimed.ref], requeue=False)
    out = cli("dead").output
    assert f"{claimed.delivery}  task=proj.poison id=t-poison queue=q1" in out
    (letter,) = json.loads(cli("dead", "--json").output)
    assert letter["task_name"] == "proj.poison" and letter["stream"] == "t-poison"
    help_text = cli("dead", "--help").output
    assert "only the dead letters of this queue" in help_text
    assert "print JSON instead of a list" in help_text
    store.close()


def test_prune_dry_run_counts_and_deletes_nothing(cli: Cli) -> None:
    store = cli.store()
    publish(store, "done")
    (claimed,) = store.claim(["q1"], 1, "w1", 30)
    store.ack([claimed.ref])
    publish(store, "waiting")
    out = cli("prune", "--older-than", "-1h", "--dry-run").output
    assert out == "would prune 1 streams (dry run: nothing deleted)\n"
    assert store.read_stream("done")
    assert cli("prune", "--older-than", "-1h").output == "pruned 1 streams\n"
    assert store.read_stream("done") == [] and store.read_stream("waiting")
    store.close()


def test_the_worker_banner_names_the_result_backend_with_its_prefix(cli: Cli) -> None:
    from celery import Celery

    cli.store().close()
    app = Celery("banner", broker="memory://", backend=f"eventstore+{cli.url}")
    app.conf.result_backend_transport_options = cli.options
    try:
        # What `celery worker`'s banner prints as "results:".
        uri = app.backend.as_uri()
        assert uri.startswith("eventstore+")
        assert uri.removeprefix("eventstore+").split(":")[0] == cli.url.split(":")[0]
    finally:
        app.close()


# -- item 5 -------------------------------------------------------------------------


def test_queues_at_a_position_or_time_shows_the_queues_then(cli: Cli) -> None:
    store = cli.store()
    publish(store, "a")
    publish(store, "b")
    (claimed,) = store.claim(["q1"], 1, "w1", 30)
    position = store.last_position()
    then = store.read_all(after=position - 1)[0].recorded_at
    store.ack([claimed.ref])
    publish(store, "c", queue="q2")

    out = cli("queues", "--at", str(position)).output.splitlines()
    assert out[0].startswith(f"as of position {position} (")
    assert out[2].split() == ["q1", "1", "0", "1", "0"]
    assert f"  in flight  {claimed.stream} (by w1)" in out
    assert "  ready      b" in out and not any(line.startswith("q2") for line in out)

    iso = datetime.fromtimestamp(then, timezone.utc).isoformat()
    data = json.loads(cli("queues", "--at", iso, "--json").output)
    (q1,) = data["queues"]
    assert (q1["ready"], q1["claimed"]) == (1, 1)
    assert q1["tasks"]["in_flight"] == [{"task": claimed.stream, "worker": "w1"}]

    now = json.loads(cli("queues", "--at", "0s", "--json").output)
    assert [(q["queue"], q["ready"], q["claimed"]) for q in now["queues"]] == [
        ("q1", 1, 0), ("q2", 1, 0)
    ]
    assert "not a log position" in cli("queues", "--at", "yesterday", code=2).output
    store.close()


def test_revoke_reason_is_kept_in_the_history(cli: Cli) -> None:
    store = cli.store()
    publish(store, "r1")
    cli("revoke", "r1", "--reason", "customer cancelled")
    (revoked,) = [r.event for r in store.read_stream("r1") if isinstance(r.event, lc.Revoked)]
    assert revoked.reason == "customer cancelled"
    store.close()
