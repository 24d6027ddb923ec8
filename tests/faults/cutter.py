"""A TCP proxy in front of PostgreSQL that loses the answer to a commit.

Once armed, the first connection that writes to the event log is cut at the
answer that tells its client the write committed: the server has committed, the
client hears only a closed connection.  That is the in-doubt commit a server
restart or a network fault can leave a producer with.  Everything else passes
through untouched, and the proxy fires once.

It reads PostgreSQL's wire protocol only as far as it must: a reply ends with a
``ReadyForQuery`` message whose status byte is ``I`` when no transaction is
open, which follows both a statement that committed on its own (autocommit) and
a ``COMMIT``.  The server must not use SSL (the embedded one does not).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator

#: ``ReadyForQuery`` with status idle: the last bytes of a reply after a commit.
READY_IDLE = b"Z\x00\x00\x00\x05I"
#: What a client sends when it writes to the event log (default table prefix).
WRITES_EVENTS = b"eventstore_events"


class CommitCutter:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream``; see the module."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed = False
        #: How many commits' answers were lost.
        self.cuts = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def url(self, database: str = "test", user: str = "postgres") -> str:
        return f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/{database}"

    def arm(self) -> None:
        with self._lock:
            self._armed = True

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            thread = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _fire(self) -> bool:
        """Take the one cut, if armed and not yet taken."""
        with self._lock:
            if not self._armed:
                return False
            self._armed = False
            self.cuts += 1
            return True

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        wrote_events = False
        with client, server, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, server)
            selector.register(server, selectors.EVENT_READ, client)
            while not self._closing:
                for key, _ in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is client:
                        wrote_events = wrote_events or WRITES_EVENTS in data
                    elif wrote_events and data.endswith(READY_IDLE):
                        wrote_events = False
                        if self._fire():
                            return  # committed; the client never hears so
                    try:
                        key.data.sendall(data)
                    except OSError:
                        return


@contextlib.contextmanager
def commit_cutter(upstream: int) -> Iterator[CommitCutter]:
    cutter = CommitCutter(upstream)
    try:
        yield cutter
    finally:
        cutter.close()
