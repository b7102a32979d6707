"""Settings from files and the environment: precedence, sources, and clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import Env, create_backlog, drainer_view, only_session


def _config_lines(env: Env, *args: str, **environ: str) -> dict[str, tuple[str, str]]:
    proc = env.run_cli("config", *args, env={**env.worker_env(), **environ})
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        option, rest = line.split(None, 1)
        value, _, source = rest.rpartition("   (")
        rows[option] = (value.strip(), source.rstrip(")"))
    return rows


def test_precedence_cli_over_environment_over_file_over_default(env: Env) -> None:
    (env.tmp / "drainer.toml").write_text(
        'batch-size = 25\nlanes = 2\nmax_attempts_per_phase = 4\nskip-run-prefix = ["old-"]\n'
        'skip-runs-with-queued = false\n[env]\nFOO = "bar"\n'
    )
    rows = _config_lines(env, "--database-url", env.url, "--batch-size", "7",
                         DRAINER_BATCH_SIZE="9", DRAINER_LANES="3")
    assert rows["--batch-size"] == ("7", "command line")
    assert rows["--lanes"] == ("3", "env DRAINER_LANES")
    assert rows["--max-attempts-per-phase"][0] == "4"
    assert rows["--max-attempts-per-phase"][1].endswith("drainer.toml")
    assert rows["--skip-run-prefix"][0] == '["old-"]'
    assert rows["--skip-runs-with-queued"][0] == "false"
    assert rows["--env"][0] == '{"FOO": "bar"}'
    assert rows["--max-log-bytes"] == ("67108864", "default")
    assert rows["--database-url"] == (env.url, "command line")


def test_pyproject_tool_drainer_is_read_when_there_is_no_drainer_toml(env: Env) -> None:
    (env.tmp / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.drainer]\nlanes = 5\n')
    rows = _config_lines(env, "--database-url", env.url)
    assert rows["--lanes"][0] == "5" and rows["--lanes"][1].endswith("pyproject.toml")


def test_run_uses_the_file_and_secrets_stay_redacted(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(4)])
    (env.tmp / "drainer.toml").write_text('batch-size = 2\n[env]\nAPI_TOKEN = "tok-s3cret"\n')
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 0, proc.stderr
    snap = drainer_view(only_session(env.sessions)[0])
    assert snap["total_processed"] == 2 and snap["config"]["env"] == {"API_TOKEN": "***"}
    shown = env.run_cli("config", "--database-url", env.url)
    assert "tok-s3cret" not in shown.stdout and '"API_TOKEN": "***"' in shown.stdout


def test_unknown_key_names_the_nearest_valid_one(env: Env) -> None:
    (env.tmp / "drainer.toml").write_text("batch_szie = 3\n")
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"drainer: error: unknown key 'batch-szie' in {env.tmp / 'drainer.toml'}; "
        "did you mean 'batch-size'?"
    ]
    assert not env.sessions.exists()


def test_bad_values_in_file_and_environment_are_exit_2(env: Env) -> None:
    (env.tmp / "drainer.toml").write_text('lanes = "many"\n')
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 2 and "--lanes" in proc.stderr
    (env.tmp / "drainer.toml").write_text("lanes = 2.5\n")
    assert env.run_cli("run", *env.base_args()).returncode == 2
    (env.tmp / "drainer.toml").unlink()
    bad_env = env.run_cli("run", *env.base_args(), env={**env.worker_env(),
                                                         "DRAINER_BATCH_SIZE": "lots"})
    assert bad_env.returncode == 2 and "DRAINER_BATCH_SIZE" in bad_env.stderr
    (env.tmp / "broken.toml").write_text("lanes = [\n")
    broken = env.run_cli("run", *env.base_args(), "--config", str(env.tmp / "broken.toml"))
    assert broken.returncode == 2 and "not valid TOML" in broken.stderr


def test_resume_keeps_what_a_config_file_sets(env: Env) -> None:
    create_backlog(env.db, [(f"run-{i}", "P", 0, "FAILED", None) for i in range(8)])
    env.run_cli("run", *env.base_args(), "--batch-size", "3",
                env=env.worker_env(DRAINER_CRASH_AT="after_exit:2"))
    (env.tmp / "drainer.toml").write_text("batch-size = 5\n")
    resumed = env.run_cli("run", *env.base_args(), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    snap = drainer_view(only_session(env.sessions)[0])
    assert snap["batch_size"] == 5  # the file's value, not the session's saved 3


def test_status_and_analyze_read_the_config_file(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    (env.tmp / "drainer.toml").write_text(
        f'database-url = "sqlite:///{env.db.name}"\nsession-dir = "team-sessions"\n'
        f'command = ["{sys.executable}", "{env.worker}", "{{run_id}}", "{{phase_id}}"]\n'
    )
    assert env.run_cli("run").returncode == 0
    status = env.run_cli("status")
    assert status.returncode == 0, status.stderr
    assert "Sessions in" in status.stdout and "team-sessions" in status.stdout
    analyze = env.run_cli("analyze", "--json")
    assert analyze.returncode == 0, analyze.stderr
    assert json.loads(analyze.stdout)["totals"]["processed"] == 1


def test_relative_paths_in_a_config_file_are_relative_to_the_file(env: Env, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    create_backlog(project / "backlog.db", [("run-0", "P", 0, "FAILED", None)])
    (project / "drainer.toml").write_text('database-url = "sqlite:///backlog.db"\n'
                                          'session-dir = "sessions"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = env.run_cli("plan", "--workspace", str(project),
                       "--command", f"{sys.executable} {env.worker} {{run_id}} {{phase_id}}")
    assert proc.returncode == 0, proc.stderr
    assert str(project / "backlog.db") in proc.stdout
    assert not (env.tmp / "backlog.db").exists()


def test_drainer_run_id_in_the_environment_is_not_a_setting(env: Env) -> None:
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None), ("run-1", "P", 0, "FAILED", None)])
    proc = env.run_cli("plan", *env.base_args(), env=env.worker_env(DRAINER_RUN_ID="run-1"))
    assert "run-0 / P" in proc.stdout and "run-1 / P" in proc.stdout


def test_unstop_is_taken_from_the_command_line_only(env: Env) -> None:
    # A one-off for one resume: DRAINER_UNSTOP used to make every drain command fail
    # ("--unstop ... give --resume too"), naming a flag the user never passed.
    create_backlog(env.db, [("run-0", "P", 0, "FAILED", None)])
    proc = env.run_cli("plan", *env.base_args(), env=env.worker_env(DRAINER_UNSTOP="run-0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run-0 / P" in proc.stdout
    (env.tmp / "drainer.toml").write_text('unstop = ["run-0"]\n')
    proc = env.run_cli("run", *env.base_args())
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"drainer: error: 'unstop' in {env.tmp / 'drainer.toml'}: --unstop is given on the "
        "command line only"
    ]
    assert not env.sessions.exists()


def test_env_values_with_commas_via_drainer_env(env: Env) -> None:
    proc = env.run_cli("config", "--database-url", env.url,
                       env=env.worker_env(DRAINER_ENV="OPTS=a,b;MODE=x"))
    assert proc.returncode == 0, proc.stderr
    assert '{"OPTS": "a,b", "MODE": "x"}' in proc.stdout
