"""A worker for the custom-schema backlog: marks its item ``running``, logs two LLM calls,
then ``done``. drainer runs it as ``python worker.py <batch> <item>``."""

from __future__ import annotations

import os
import sqlite3
import sys


def main() -> int:
    batch, item = sys.argv[1], sys.argv[2]
    db = sqlite3.connect(os.environ["DATABASE_URL"].removeprefix("sqlite:///"), timeout=30)
    db.execute("UPDATE work_items SET status = 'running' WHERE batch = ? AND item = ?",
               (batch, item))
    db.commit()
    db.executemany("INSERT INTO llm_calls (batch, item) VALUES (?, ?)", [(batch, item)] * 2)
    db.execute("UPDATE work_items SET status = 'done', error_text = NULL "
               "WHERE batch = ? AND item = ?", (batch, item))
    db.commit()
    print(f"{batch}/{item} done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
