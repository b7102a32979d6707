"""Ids from the database are data: one that no worker can be given is skipped with a one-line
reason, and never blocks the other phases or crashes a session."""

from __future__ import annotations

import json
import sys

from conftest import Env, create_backlog, phase_states, session_info


def test_a_nul_byte_in_an_id_is_skipped_and_the_other_phases_drain(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P", 0, "FAILED", None),
                            ("bad\x00run", "P", 0, "FAILED", None),
                            ("run-c", "bad\x00phase", 0, "FAILED", None),
                            ("run-c", "Q", 1, "FAILED", None)])
    args = [*env.base_args(), "--max-attempts-per-phase", "1"]
    for _ in range(2):  # a later session is not blocked by it either
        proc = env.run_cli("run", *args, env=env.worker_env(WORKER_KIND="fail"))
        assert proc.returncode == 1, proc.stderr  # the workers fail by design
        assert "Traceback" not in proc.stderr, proc.stderr
        skips = [line.strip() for line in proc.stdout.splitlines() if "[SKIP]" in line]
        assert skips == [
            "[SKIP] 'bad\\x00run' / 'P': its id holds a NUL byte, which no worker can be "
            "given (argv and environment)",
            "[SKIP] 'run-c' / 'bad\\x00phase': its id holds a NUL byte, which no worker can "
            "be given (argv and environment)",
        ]
        [saved] = [line for line in proc.stdout.splitlines() if line.startswith("Session saved:")]
        snapshot = env.tmp / saved.split(":", 1)[1].strip()
        snap = json.loads(snapshot.read_text())
        assert session_info(snapshot.parent / snapshot.stem)["stop_reason"] == "no_candidates"
        drained = sorted((r["run_id"], r["phase_id"]) for r in snap["results"])
        assert drained == [("run-a", "P"), ("run-c", "Q")]
    states = phase_states(env.db)
    assert states[("bad\x00run", "P")] == ("FAILED", None)  # untouched
    assert states[("run-c", "bad\x00phase")] == ("FAILED", None)


def test_plan_lists_a_phase_no_worker_can_be_given(env: Env) -> None:
    create_backlog(env.db, [("run-a", "P", 0, "FAILED", None),
                            ("bad\x00run", "P", 0, "FAILED", None)])
    proc = env.run_cli("plan", *env.base_args())
    assert proc.returncode == 0, proc.stderr
    assert "NUL byte" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_an_id_longer_than_the_kernel_passes_is_skipped_and_never_floods_the_screen(
        env: Env) -> None:
    # 140,000 characters: over the 128 KiB the kernel allows one argv or environment string
    # (it was attempted, failed with "Argument list too long", and retried, printing the
    # whole id on every line). 1,000 characters is long but fine: it drains.
    huge, long = "r" * 140_000, "L" * 1_000
    create_backlog(env.db, [(huge, "P", 0, "FAILED", None), ("run-c", "p" * 140_000, 0,
                                                               "FAILED", None),
                            (long, "P", 0, "FAILED", None), ("run-c", "Q", 1, "FAILED", None)])
    proc = env.run_cli("run", *env.base_args(), "--max-attempts-per-phase", "1",
                       env=env.worker_env(WORKER_KIND="ok"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    skips = [line.strip() for line in proc.stdout.splitlines() if "[SKIP]" in line]
    assert len(skips) == 2 and all("longer than 131,054 bytes" in s for s in skips), skips
    assert max(len(line) for line in proc.stdout.splitlines()) < 2_000
    states = phase_states(env.db)
    assert states[(huge, "P")] == ("FAILED", None)  # untouched
    assert states[(long, "P")][0] == states[("run-c", "Q")][0] == "COMPLETE"
    plan = env.run_cli("plan", *env.base_args())
    assert plan.returncode == 0 and "longer than 131,054 bytes" in plan.stdout
    assert max(len(line) for line in plan.stdout.splitlines()) < 2_000


def test_ids_that_fit_alone_but_not_together_in_one_argument_are_skipped(env: Env) -> None:
    # Each id (70,000 characters) fits in an argument and in the environment; joined in one
    # argument by the command template they do not (the kernel refuses 128 KiB): skipped,
    # never attempted. With a template that passes them apart, the same phase drains.
    run_id, phase_id = "r" * 70_000, "p" * 70_000
    create_backlog(env.db, [(run_id, phase_id, 0, "FAILED", None), ("run-ok", "P", 0, "FAILED", None)])
    joined = f"{sys.executable} {env.worker} {{run_id}}/{{phase_id}} x"
    proc = env.run_cli("run", *env.base_args(joined), env=env.worker_env(WORKER_KIND="fail"))
    skips = [line for line in proc.stdout.splitlines() if "[SKIP]" in line]
    assert len(skips) == 1 and "longer than the kernel's limit on one argv string" in skips[0]
    assert "Argument list too long" not in proc.stdout
    assert phase_states(env.db)[(run_id, phase_id)] == ("FAILED", None)  # never attempted
    plan = env.run_cli("plan", *env.base_args(joined))
    assert "longer than the kernel's limit on one argv string" in plan.stdout
    apart = env.run_cli("run", *env.base_args(), env=env.worker_env(WORKER_KIND="ok"))
    assert apart.returncode == 0, apart.stdout[-2000:] + apart.stderr
    assert phase_states(env.db)[(run_id, phase_id)][0] == "COMPLETE"
