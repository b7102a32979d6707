"""Build a backlog that is not Autopack's: table ``work_items``, other column names, lowercase
states. ``python make_backlog.py backlog.db`` creates it with 6 failed items in 3 batches."""

from __future__ import annotations

import sqlite3
import sys

SCHEMA = """
CREATE TABLE work_items (
    id INTEGER PRIMARY KEY,
    batch TEXT NOT NULL,
    item TEXT NOT NULL,
    position INTEGER NOT NULL,
    status TEXT NOT NULL,
    error_text TEXT,
    UNIQUE (batch, item)
);
CREATE TABLE llm_calls (id INTEGER PRIMARY KEY, batch TEXT NOT NULL, item TEXT NOT NULL);
"""


def main(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    for b in range(3):
        for i in range(2):
            conn.execute(
                "INSERT INTO work_items (batch, item, position, status, error_text) "
                "VALUES (?, ?, ?, 'failed', 'flaky upstream')",
                (f"batch-{b}", f"item-{i}", i),
            )
    conn.commit()
    conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
