"""One attempt against real processes: timeouts, tree kills, pipes held open, log caps."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from pathlib import Path

import anyio
import psutil
import pytest

from drainer import proctree
from drainer.sinks import LogSink
from drainer.supervisor import AttemptSpec, Supervisor

pytestmark = pytest.mark.anyio


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _spec(tmp_path: Path, code: str, **kw: object) -> AttemptSpec:
    attempt_id = str(uuid.uuid4())
    env = {**os.environ, "DRAINER_ATTEMPT_ID": attempt_id, "PIDS": str(tmp_path / "pids.json")}
    defaults: dict[str, object] = {
        "argv": [sys.executable, "-c", textwrap.dedent(code)],
        "env": env,
        "cwd": tmp_path,
        "attempt_id": attempt_id,
        "stdout_path": tmp_path / "out.txt",
        "stderr_path": tmp_path / "err.txt",
        "timeout": 30.0,
        "kill_grace_period": 0.5,
        "max_log_bytes": 1 << 20,
    }
    defaults.update(kw)
    return AttemptSpec(**defaults)  # type: ignore[arg-type]


# Spawns a grandchild that calls setsid and ignores SIGTERM, and a plain grandchild; the
# worker itself ignores SIGTERM too, so only SIGKILL and the marker sweep can end them all.
TREE_WORKER = """
    import json, os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    escapee = subprocess.Popen([sys.executable, "-c",
        "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "time.sleep(600)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["PIDS"] + ".tmp", "w") as fh:
        json.dump([os.getpid(), escapee.pid, plain.pid], fh)
    os.rename(os.environ["PIDS"] + ".tmp", os.environ["PIDS"])
    print("ready", flush=True)
    time.sleep(600)
"""


async def test_timeout_kills_worker_and_setsid_grandchild(tmp_path: Path) -> None:
    spec = _spec(tmp_path, TREE_WORKER, timeout=3.0)
    result = await Supervisor(spec).run()
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert result.timed_out
    assert result.returncode == -9  # SIGTERM was ignored: SIGKILL after the grace
    assert [pid for pid in pids if _alive(pid)] == []
    assert proctree.find_attempt_processes(spec.attempt_id) == []
    assert (tmp_path / "out.txt").read_text() == "ready\n"


async def test_cancel_kills_tree_and_reraises(tmp_path: Path) -> None:
    spec = _spec(tmp_path, TREE_WORKER, timeout=None)
    supervisor = Supervisor(spec)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervisor.run)
            with anyio.fail_after(30):
                # The worker's only signal is the file it renames into place.
                while not (tmp_path / "pids.json").exists():  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            scope.cancel()
    assert scope.cancelled_caught
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert supervisor.result.cancelled
    assert [pid for pid in pids if _alive(pid)] == []
    assert proctree.find_attempt_processes(spec.attempt_id) == []


async def test_grandchild_holding_the_pipe_does_not_hang(tmp_path: Path) -> None:
    # The worker exits at once; its grandchild inherits stdout and would keep it open 600 s.
    code = """
        import json, os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        json.dump([child.pid], open(os.environ["PIDS"], "w"))
        print("worker done", flush=True)
    """
    spec = _spec(tmp_path, code, timeout=300.0)
    with anyio.fail_after(60):  # guard only: a hang would take 300 s (the timeout)
        result = await Supervisor(spec).run()
    (grandchild,) = json.loads((tmp_path / "pids.json").read_text())
    assert not result.timed_out
    assert result.returncode == 0
    assert [p.pid for p in result.leaked] == [grandchild]
    assert not _alive(grandchild)
    assert "worker done" in result.stdout_tail


async def test_leak_with_report_policy_is_recorded_and_left_alive(tmp_path: Path) -> None:
    code = """
        import json, os, subprocess, sys
        srv = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "uvicorn"],
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        json.dump([srv.pid], open(os.environ["PIDS"], "w"))
    """
    spec = _spec(tmp_path, code, kill_leaks=False)
    result = await Supervisor(spec).run()
    (server,) = json.loads((tmp_path / "pids.json").read_text())
    try:
        assert [p.pid for p in result.leaked] == [server]
        assert "uvicorn" in result.leaked[0].cmdline
        assert _alive(server)
    finally:
        psutil.Process(server).kill()


async def test_log_is_capped_with_marker(tmp_path: Path) -> None:
    code = """
        import sys
        sys.stdout.buffer.write(b"a" * 300000)
        sys.stderr.write("tail-of-stderr\\n")
    """
    result = await Supervisor(_spec(tmp_path, code, max_log_bytes=1000)).run()
    data = (tmp_path / "out.txt").read_bytes()
    assert data.startswith(b"a" * 1000)
    assert data[1000:].decode().strip() == (
        "[drainer] log truncated at 1000 bytes: 299000 more bytes were dropped"
    )
    assert result.stdout_bytes == 300000
    assert result.stderr_tail == "tail-of-stderr\n"


async def test_missing_program_is_a_spawn_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "", argv=[str(tmp_path / "no-such-worker")])
    result = await Supervisor(spec).run()
    assert result.spawn_error is not None and "no-such-worker" in result.spawn_error
    assert result.returncode is None


async def test_sink_redacts_a_secret_split_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    async with LogSink(path, max_bytes=1000, secrets=("hunter2pw",)) as sink:
        for chunk in (b"url=postgresql://u:hun", b"ter2", b"pw@h/db\n", b"again hunter2pw"):
            await sink.write(chunk)
    text = path.read_text()
    assert "hunter2pw" not in text
    assert text == "url=postgresql://u:***@h/db\nagain ***"


# The worker and its child each hold memory they wrote to, until the file GO appears.
MEMORY_WORKER = """
    import os, subprocess, sys, time
    go = os.environ["PIDS"] + ".go"
    wait = f"import os, time\\nwhile not os.path.exists({go!r}): time.sleep(0.02)"
    child = subprocess.Popen([sys.executable, "-c", "held = b'c' * (60 << 20)\\n" + wait])
    held = b"w" * (80 << 20)
    exec(wait)
    child.wait()
"""


async def test_the_session_sampler_measures_each_workers_whole_tree(tmp_path: Path) -> None:
    from drainer.supervisor import RssSampler

    sampler = RssSampler(interval=0.05)
    spec = _spec(tmp_path, MEMORY_WORKER)
    supervisor = Supervisor(spec, sampler=sampler)
    go = tmp_path / "pids.json.go"

    async def release_when_measured() -> None:
        with anyio.fail_after(30):
            while (supervisor.result.peak_rss_bytes or 0) < 140 << 20:  # noqa: ASYNC110 - polls what the sampler wrote
                await anyio.sleep(0.05)
            pid = supervisor.result.pid
            assert pid is not None
            # The cheap walk finds what psutil finds (which scans every process for it).
            assert set(proctree.descendants(pid)) == {
                p.pid for p in psutil.Process(pid).children(recursive=True)}
        go.touch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler.run)
        tg.start_soon(release_when_measured)
        result = await supervisor.run()
        tg.cancel_scope.cancel()
    assert result.returncode == 0
    assert (result.peak_rss_bytes or 0) >= 140 << 20
    assert sampler._watched == {}  # nothing kept once the attempt is over


async def test_a_log_that_cannot_be_written_fails_the_attempt_after_its_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the log files: the attempt raises what writing raised (as the
    session's other writes do), once its worker has ended; the worker is never blocked on a
    pipe nobody reads, and nothing of its tree is left."""
    import errno

    def disk_full(self: LogSink, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LogSink, "feed", disk_full)
    spec = _spec(tmp_path, """
        import sys
        for _ in range(64):
            sys.stdout.write("x" * 65536)  # 4 MiB: far more than a pipe holds
        sys.stdout.flush()
    """)
    supervisor = Supervisor(spec)
    with pytest.raises(OSError, match="No space left"):
        await supervisor.run()
    assert supervisor.result.returncode == 0  # it wrote everything and exited on its own
    assert proctree.find_attempt_processes(spec.attempt_id) == []
