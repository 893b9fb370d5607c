"""The orchestrator's journal: an append-only log in sqlite, so a killed orchestrator resumes.

Every entry is a protocol frame (the codec already carries any wire value, tensors included):

- ``job``: the graph as first submitted, one `graph.patch` of `add_task` ops;
- ``dispatch``: a `task.assign` sent (so a resumed run numbers its attempts after these);
- ``result``: a `task.result` accepted, written *before* the orchestrator acts on it;
- ``failed`` / ``cancelled``: a task given up (`task.failed`, `task.cancel`);
- ``patch``: a `graph.patch` applied while the job ran.

sqlite in WAL mode with ``synchronous=NORMAL``: each commit reaches the operating system before
the call returns, so a SIGKILLed process loses nothing it committed (a power cut may lose the
last commits; use ``synchronous=FULL`` for that, at a cost per task).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from protocol import Envelope, decode, encode

__all__ = ["Journal", "JournalEntry"]

EntryKind = Literal["job", "dispatch", "result", "failed", "cancelled", "patch"]
JournalEntry = tuple[EntryKind, Envelope]


class Journal:
    """Append-only log of one or more jobs in a sqlite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " job TEXT NOT NULL, kind TEXT NOT NULL, frame BLOB NOT NULL)"
        )

    def append(self, job: str, kind: EntryKind, env: Envelope) -> None:
        """Write one entry; it is durable against a process kill when this returns."""
        self._db.execute("INSERT INTO entries (job, kind, frame) VALUES (?, ?, ?)", (job, kind, encode(env)))

    def jobs(self) -> list[str]:
        """Jobs with an entry, oldest first."""
        rows = self._db.execute("SELECT job FROM entries WHERE kind = 'job' ORDER BY seq").fetchall()
        return [row[0] for row in rows]

    def entries(self, job: str) -> Iterator[JournalEntry]:
        """The entries of `job` in the order written."""
        cursor = self._db.execute("SELECT kind, frame FROM entries WHERE job = ? ORDER BY seq", (job,))
        for kind, frame in cursor:
            yield kind, decode(frame, fresh=False)

    def close(self) -> None:
        self._db.close()
