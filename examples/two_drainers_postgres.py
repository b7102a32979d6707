"""Two drainers, two lanes each, sharing one PostgreSQL backlog (as two hosts would).

Needs the `postgres` extra and a PostgreSQL server; creates a throwaway database there.
Run:  python examples/two_drainers_postgres.py postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import uuid
from importlib.resources import files
from pathlib import Path

import asyncpg

WORKER = '''
import asyncio, os, sys, asyncpg
async def main():
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    await conn.execute("UPDATE phases SET state='COMPLETE' WHERE run_id=$1 AND phase_id=$2",
                       sys.argv[1], sys.argv[2])
    await conn.close()
asyncio.run(main())
'''


def pg_schema() -> str:
    sql = files("drainer.demo").joinpath("autopack-schema.sql").read_text()
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    return (sql.replace("INTEGER PRIMARY KEY", "SERIAL PRIMARY KEY")
               .replace("DATETIME", "TIMESTAMP")
               .replace("BOOLEAN NOT NULL DEFAULT 0", "BOOLEAN NOT NULL DEFAULT false"))


async def create(admin_url: str, name: str) -> str:
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url)
    await conn.execute(pg_schema())
    for r in range(12):
        await conn.execute("INSERT INTO runs (id) VALUES ($1)", f"run-{r}")
        tier = await conn.fetchval("INSERT INTO tiers (tier_id, run_id, tier_index, name) "
                                   "VALUES ('T1', $1, 0, 't') RETURNING id", f"run-{r}")
        for p in range(3):
            await conn.execute(
                "INSERT INTO phases (phase_id, run_id, tier_id, phase_index, name, state) "
                "VALUES ($1, $2, $3, $4, $1, 'FAILED')", f"P{p}", f"run-{r}", tier, p)
    await conn.close()
    return url


async def drop(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def main(admin_url: str) -> int:
    name = f"drainer_example_{uuid.uuid4().hex[:8]}"
    url = asyncio.run(create(admin_url, name))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            worker = Path(tmp) / "worker.py"
            worker.write_text(WORKER)
            drainers = [
                subprocess.Popen(
                    [sys.executable, "-m", "drainer", "run", "--database-url", url,
                     "--command", f"{sys.executable} {worker} {{run_id}} {{phase_id}}",
                     "--session-dir", f"{tmp}/host-{n}", "--lanes", "2", "--batch-size", "100",
                     "--json"],
                    stdout=subprocess.PIPE, text=True)
                for n in (1, 2)
            ]
            # Wait for both before reading either, so neither outlives the temporary directory.
            outputs = [proc.communicate(timeout=300)[0] for proc in drainers]
            status = 0
            for n, (proc, out) in enumerate(zip(drainers, outputs, strict=True), start=1):
                if proc.returncode != 0 or not out.strip():
                    print(f"drainer {n} failed (exit {proc.returncode})", file=sys.stderr)
                    status = 1
                    continue
                last = json.loads(out.splitlines()[-1])
                print(f"drainer {n}: {last['ok']} phases drained "
                      f"(stop: {last['stop_reason']}, exit {proc.returncode})")
    finally:
        asyncio.run(drop(admin_url, name))
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else
                          "postgresql://postgres@127.0.0.1:5432/test"))
