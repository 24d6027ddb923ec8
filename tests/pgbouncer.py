"""A throwaway PgBouncer in transaction pooling mode in front of a private
PostgreSQL (:class:`pgserver.EmbeddedPostgres`), on a free port of its own.

Needs Debian's ``pgbouncer`` package (``.ci/run`` installs it).  PgBouncer refuses
to run as root, so as root it runs as the system user the PostgreSQL server runs as.
Importable by name from any test directory: ``from pgbouncer import PgBouncer``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pgserver import EMBEDDED_DATABASE, EMBEDDED_SUPERUSER, EmbeddedPostgres, free_port

READY_TIMEOUT = 20.0


def find_or_install_pgbouncer() -> str:
    """The pgbouncer program; on a fresh Debian machine, installed first (as
    ``.ci/run`` does), so the README's test command needs no extra step."""
    def found() -> str | None:
        program = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        return program if Path(program).exists() else None

    program = found()
    if program is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], env=env,
                       capture_output=True)
        program = found()
    if program is None:
        raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
    return program


class PgBouncer:
    """``pgbouncer`` with ``pool_mode = transaction`` and ``pool_size`` server
    connections per database and user: clients share them transaction by transaction."""

    def __init__(self, base: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.base = base
        self.port = port
        self.proc = proc
        self.log = base / "pgbouncer.log"

    def url(self, driver: str = "psycopg2") -> str:
        return (
            f"postgresql+{driver}://{EMBEDDED_SUPERUSER}@127.0.0.1:{self.port}/"
            f"{EMBEDDED_DATABASE}"
        )

    @classmethod
    def start(cls, server: EmbeddedPostgres, pool_size: int = 4) -> PgBouncer:
        program = find_or_install_pgbouncer()
        base = Path(tempfile.mkdtemp(prefix="celery-eventstore-pgbouncer-"))
        port = free_port()
        (base / "users.txt").write_text(f'"{EMBEDDED_SUPERUSER}" ""\n')
        (base / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{EMBEDDED_DATABASE} = host=127.0.0.1 port={server.port} "
            f"dbname={EMBEDDED_DATABASE}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            f"unix_socket_dir = {base}\n"
            "auth_type = trust\n"
            f"auth_file = {base / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            "server_reset_query =\n"
            # psycopg sets these at connect time; pass them through, not refuse.
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {base / 'pgbouncer.log'}\n"
            f"pidfile = {base / 'pgbouncer.pid'}\n"
        )
        if server.run_as is not None:
            shutil.chown(base, user=server.run_as)
            for path in base.iterdir():
                shutil.chown(path, user=server.run_as)
        proc = subprocess.Popen(
            [program, str(base / "pgbouncer.ini")],
            cwd=base,
            user=server.run_as,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        bouncer = cls(base, port, proc)
        bouncer._wait_ready()
        return bouncer

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else ""
                self.stop()
                raise RuntimeError(f"pgbouncer exited with {self.proc.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("pgbouncer did not listen in time") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)
