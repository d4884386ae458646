"""The operator commands on the local state: ``state show``, ``state retry``, ``state abandon``.

Real SQLite state made through :class:`Store`; the CLI runs in-process through CliRunner, and
as a real process beside a real ``goflow-gpu serve`` (the scripted engine, the simulator) for
the promise that matters most: ``state show`` works while a worker holds the state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from goflow_gpu.cli import app
from goflow_gpu.store import MIGRATIONS, ComboKey, Store
from tests.test_store import body, manifest, plan

REASON = (
    "status PUT completed refused: 409 Conflict "
    '{"detail": "project [3fa8] is archived; no status change allowed", "code": "archived"}'
)
KEY = "made-up-state-cli-key-0001"
HARNESS = Path(__file__).with_name("crash_worker.py")


@pytest.fixture(autouse=True)
def _no_env_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The commands must only see the --state-dir the tests pass; the default state directory
    # (~/.local/state/goflow-gpu, suggested when a directory has no state) is under tmp_path.
    monkeypatch.delenv("GOFLOW_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def invoke(state: Path, *args: str, input: str | None = None, columns: int = 250) -> Result:
    return CliRunner().invoke(
        app,
        ["state", *args, "--state-dir", str(state)],
        input=input,
        env={"COLUMNS": str(columns)},
    )


def make_job(state: Path, *, parked: str | None = None, closed: str | None = None) -> str:
    """One job (2 media x 3 analyses): one combination reported; optionally parked or closed."""
    raw: dict[str, Any] = manifest()
    raw["project"]["name"] = "Spring campaign"
    with Store.open(state) as store:
        store.create_job(raw, plan(raw))
        key = ComboKey(raw["project"]["id"], raw["media"][0]["id"], raw["analyses"][0]["id"])
        store.mark_ready(key, body("completed"), "completed")
        store.mark_posting(key)
        store.mark_reported(key, 201)
        if parked is not None:
            store.park_job(raw["project"]["id"], parked)
        if closed is not None:
            store.close_job(raw["project"]["id"], reason=closed)
    return str(raw["project"]["id"])


def make_failing_job(state: Path) -> dict[str, Any]:
    """A job (2 media x 3 analyses) with one combination failed by QA after two attempts and
    reported as failed, one refused by the backend (409), one reported completed; the other
    three still pending. Returns the manifest."""
    raw: dict[str, Any] = manifest()
    raw["project"]["name"] = "Autumn"
    pid, media, analyses = raw["project"]["id"], raw["media"], raw["analyses"]
    with Store.open(state) as store:
        store.create_job(raw, plan(raw))
        qa = ComboKey(pid, media[0]["id"], analyses[1]["id"])
        store.record_attempt(qa, ["objects: 0 items, at least 1 required"])
        store.record_attempt(qa, ["objects: 0 items, at least 1 required", "x: not an integer"])
        store.mark_ready(qa, body("failed"), "failed")
        store.mark_posting(qa)
        store.mark_reported(qa, 201)
        refused = ComboKey(pid, media[1]["id"], analyses[2]["id"])
        store.mark_ready(refused, body("completed"), "completed")
        store.mark_posting(refused)
        store.mark_rejected(refused, 409, "locked by a reviewer")
        done = ComboKey(pid, media[0]["id"], analyses[0]["id"])
        store.mark_ready(done, body("completed"), "completed")
        store.mark_posting(done)
        store.mark_reported(done, 201)
    return raw


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def stored(state: Path, pid: str) -> tuple[Any, list[str]]:
    with Store.open(state) as store:
        return store.job(pid), store.unfinished_jobs()


def files_of(state: Path) -> dict[str, str]:
    """Every file under the state directory with the hash of its bytes."""
    return {
        str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state.rglob("*"))
        if p.is_file()
    }


def lines_by_project(stdout: str) -> dict[str, list[str]]:
    """The job table's rows by project id (the first column), split into their columns."""
    rows = [re.split(r"\s{2,}", line) for line in stdout.splitlines() if line[:1] not in " "]
    return {cells[0]: cells for cells in rows if len(cells[0]) == 36 and cells[0].count("-") == 4}


# ---------------------------------------------------------------------- show


def test_show_marks_parked_job_and_lists_its_full_reason_and_since(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = time.time()
    parked = make_job(state, parked=REASON)
    running = make_job(state)
    with Store.open(state) as store:
        job = store.job(parked)
        assert job is not None and job.attention_at is not None
        since = iso(job.attention_at)
    assert job.attention_at >= before - 1

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    rows = lines_by_project(result.stdout)
    assert set(rows) == {parked, running}
    assert rows[parked][1:6] == [
        "Spring campaign",
        "needs-attention",
        "6",
        "pending 5, reported 1",
        "0",
    ]
    assert rows[running][2] == "open"
    assert "1 job(s) need attention" in result.stdout
    # The reason in full (brackets and quotes kept, no markup), with since when, on one line.
    assert f"  {parked} needs attention since {since}: {REASON}\n" in result.stdout
    assert since.endswith("+00:00")
    assert running not in result.stdout.split("need attention", 1)[1]


def test_show_lists_abandoned_job_with_its_closed_reason(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, closed="abandoned by operator: wrong client")

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    assert "1 job(s) closed without their report:" in result.stdout
    assert f"  {pid} closed " in result.stdout
    assert result.stdout.rstrip().endswith(": abandoned by operator: wrong client")
    assert "need attention" not in result.stdout


def test_show_without_parked_or_abandoned_jobs_prints_the_table_and_versions(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    pid = make_job(state)

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"state in {state.resolve()}: 1 job(s)"
    assert f"  {pid}: a-0 v3, a-1 v3, a-2 v3\n" in result.stdout
    assert "need attention" not in result.stdout
    assert "closed without" not in result.stdout
    assert "failed combination" not in result.stdout


def test_show_prints_whole_ids_and_failures_on_a_narrow_terminal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    raw = make_failing_job(state)
    pid = raw["project"]["id"]
    m0, m1 = raw["media"][0]["id"], raw["media"][1]["id"]

    result = invoke(state, "show", columns=40)  # far narrower than one row

    assert result.exit_code == 0, result.output
    rows = lines_by_project(result.stdout)
    assert list(rows) == [pid]  # the whole id, on one line, not folded or cut
    assert rows[pid][1:6] == ["Autumn", "open", "6", "pending 3, reported 2, rejected 1", "2"]
    assert "2 failed combination(s):\n" in result.stdout
    assert (
        f"  {pid}  media {m0}  a-1 v3 [reported]: failed after 2 QA attempt(s): "
        "objects: 0 items, at least 1 required; x: not an integer\n"
    ) in result.stdout
    assert (
        f"  {pid}  media {m1}  a-2 v3 [rejected]: refused by the backend (HTTP 409): "
        "locked by a reviewer\n"
    ) in result.stdout


def test_show_json_is_one_documented_document(tmp_path: Path) -> None:
    state = tmp_path / "state"
    raw = make_failing_job(state)
    parked = make_job(state, parked=REASON)
    with Store.open(state) as store:
        store.record_rejected_manifest({"project": {}}, "project.id: missing")
        parked_job, job = store.job(parked), store.job(raw["project"]["id"])
    assert parked_job is not None and parked_job.attention_at is not None and job is not None
    parked_at, created = parked_job.attention_at, job.created_at
    pid, media, analyses = raw["project"]["id"], raw["media"], raw["analyses"]

    result = invoke(state, "show", "--json", columns=40)

    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # the whole of stdout is the one document
    assert set(doc) == {"format", "state_dir", "jobs", "rejected_manifests"}
    assert doc["format"] == 1
    assert doc["state_dir"] == str(state.resolve())
    assert [job["project_id"] for job in doc["jobs"]] == [pid, parked]
    first, second = doc["jobs"]
    assert first == {
        "project_id": pid,
        "name": "Autumn",
        "state": "open",
        "needs_attention": False,
        "attention": None,
        "created_at": iso(created),
        "closed_at": None,
        "closed_reason": None,
        "statuses": {"processing": "no", "completed": "no"},
        "report": "no",
        "combinations": 6,
        "counts": {"pending": 3, "ready": 0, "posting": 0, "reported": 2, "rejected": 1},
        "failed": 2,
        "prompt_versions": {"a-0": [3], "a-1": [3], "a-2": [3]},
        "failures": [
            {
                "media_id": media[0]["id"],
                "analysis_id": analyses[1]["id"],
                "analysis": "a-1",
                "spec_version": 3,
                "state": "reported",
                "result_status": "failed",
                "attempts": 2,
                "reasons": ["objects: 0 items, at least 1 required", "x: not an integer"],
                "http_status": 201,
                "server_detail": None,
            },
            {
                "media_id": media[1]["id"],
                "analysis_id": analyses[2]["id"],
                "analysis": "a-2",
                "spec_version": 3,
                "state": "rejected",
                "result_status": "completed",
                "attempts": 0,
                "reasons": [],
                "http_status": 409,
                "server_detail": "locked by a reviewer",
            },
        ],
    }
    assert second["state"] == "open" and second["needs_attention"] is True
    assert second["attention"] == {"reason": REASON, "since": iso(parked_at)}
    assert second["failed"] == 0 and second["failures"] == []
    assert len(doc["rejected_manifests"]) == 1
    assert doc["rejected_manifests"][0]["error"] == "project.id: missing"
    assert result.stderr == ""


def test_show_escapes_control_characters_from_the_backend(tmp_path: Path) -> None:
    state = tmp_path / "state"
    raw = manifest()
    raw["project"]["name"] = "evil\x1b[2Jname"
    with Store.open(state) as store:
        store.create_job(raw, plan(raw))

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "evil\\x1b[2Jname" in result.stdout


# ---------------------------------------------------------------------- read-only


def test_show_beside_a_lock_holder_writes_nothing_and_retry_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, parked=REASON)
    with Store.open(state) as worker:  # holds the directory lock like a running worker
        before = files_of(state)
        version = worker.conn.execute("PRAGMA data_version").fetchone()[0]

        shown = invoke(state, "show")
        retried = invoke(state, "retry", pid)
        abandoned = invoke(state, "abandon", pid, "--yes")

        assert shown.exit_code == 0, shown.output
        assert pid in shown.stdout
        # Nothing was committed by anyone else and no file changed (the lock file included).
        assert worker.conn.execute("PRAGMA data_version").fetchone()[0] == version
        assert files_of(state) == before
    for refused, command in ((retried, "retry"), (abandoned, "abandon")):
        assert refused.exit_code == 4, refused.output
        assert f"is in use by another worker (pid {os.getpid()})" in refused.stderr
        assert f"`goflow-gpu state {command}` changes the state" in refused.stderr
        assert "stop the worker" in refused.stderr
    job, _ = stored(state, pid)
    assert (job.state, job.attention) == ("open", REASON)


def test_show_takes_no_lock_file_and_leaves_the_database_bytes_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_job(state)
    (state / "state.lock").unlink()
    db = state / "state.db"
    before = (db.read_bytes(), db.stat().st_mtime_ns)

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    assert not (state / "state.lock").exists()
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    # SQLite needs a WAL index to read a WAL database; those it adds hold no data.
    assert {p.name for p in state.iterdir()} <= {"state.db", "state.db-wal", "state.db-shm"}
    assert not (state / "state.db-wal").exists() or (state / "state.db-wal").stat().st_size == 0


def test_show_refuses_an_older_schema_without_upgrading_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "state.db")
    conn.executescript(
        "CREATE TABLE schema_migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        f"applied_at REAL NOT NULL); {MIGRATIONS[0][1]}; "
        "INSERT INTO schema_migrations VALUES (1, 'initial', 0);"
    )
    conn.close()
    before = files_of(state)

    result = invoke(state, "show")

    assert result.exit_code == 4
    assert "written by an older goflow-gpu (migrations 2 (needs-attention) not applied)" in (
        result.stderr.replace("\n", " ")
    )
    assert files_of(state) == before


def test_show_refuses_a_sqlite_file_that_is_no_goflow_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.db").write_bytes(b"")

    result = invoke(state, "show")

    assert result.exit_code == 4
    assert "is not a goflow state database" in result.stderr
    assert (state / "state.db").read_bytes() == b""


# ---------------------------------------------------------------------- beside a real worker


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("goflow-gpu")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "goflow_gpu"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Any, subprocess.Popen[str], Path, dict[str, str]]]:
    """A real `goflow-gpu serve` (scripted engine: 0.5 s a request, one at a time) polling the
    simulator; stopped with SIGTERM at the end (it must drain and exit 0)."""
    from goflow_gpu.simulator import Simulator, SimulatorThread

    state = tmp_path / "state"
    env = dict(
        os.environ,
        GOFLOW_API_KEY=KEY,
        ENGINE_DELAY="0.5",
        ENGINE_SLOTS="1",
        GOFLOW_POLL_INTERVAL_MIN="0.05",
        GOFLOW_POLL_INTERVAL_MAX="0.2",
        GOFLOW_LOG_FORMAT="json",
        COLUMNS="80",
    )
    env.pop("GOFLOW_STATE_DIR", None)
    with SimulatorThread(Simulator(api_key=KEY, seed=16)) as sim:
        command = [sys.executable, str(HARNESS), "cli", "serve"]
        command += ["--base-url", sim.base_url, "--state-dir", str(state)]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            yield sim, proc, state, env
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]


def _alive(proc: subprocess.Popen[str], deadline: float, what: str) -> None:
    if proc.poll() is not None:
        _, stderr = proc.communicate()
        pytest.fail(f"{what}: serve exited {proc.returncode}: {stderr[-3000:]}")
    assert time.monotonic() < deadline, what


def test_show_works_beside_a_running_serve_and_changes_nothing(
    serving: tuple[Any, subprocess.Popen[str], Path, dict[str, str]],
) -> None:
    sim, proc, state, env = serving
    manifest_ = sim.add_job(media=4, analyses=4)  # 16 requests, one at a time: about 8 s
    project = manifest_["project"]["id"]
    deadline = time.monotonic() + 60
    while not sim.ledger_snapshot()["statuses"].get(project):
        _alive(proc, deadline, "serve never took the job")
        time.sleep(0.05)

    # While the job runs (serve holds the state lock and writes).
    started = time.monotonic()
    during = _cli("state", "show", "--json", "--state-dir", str(state), env=env)
    took = time.monotonic() - started
    retry = _cli("state", "retry", project, "--state-dir", str(state), env=env)

    assert during.returncode == 0, during.stderr
    assert took < 20, f"state show took {took:.1f} s beside serve"
    job = json.loads(during.stdout)["jobs"][0]
    assert (job["project_id"], job["state"], job["combinations"]) == (project.lower(), "open", 16)
    assert job["statuses"]["processing"] in ("intent", "sent")
    assert retry.returncode == 4
    assert f"state directory {state.resolve()} is in use by another worker (pid " in retry.stderr
    assert "stop the worker" in retry.stderr
    assert proc.poll() is None  # the worker was not disturbed

    # Once the job is done, serve idles (polling next-job) and still holds the lock.
    while not sim.ledger_snapshot()["reports"].get(project):
        _alive(proc, deadline, "the job never finished")
        time.sleep(0.05)
    time.sleep(0.5)
    probe = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    try:
        version = probe.execute("PRAGMA data_version").fetchone()[0]
        before = files_of(state)
        after_job = _cli("state", "show", "--state-dir", str(state), env=env)
        assert probe.execute("PRAGMA data_version").fetchone()[0] == version
        assert files_of(state) == before
    finally:
        probe.close()
    assert after_job.returncode == 0, after_job.stderr
    rows = lines_by_project(after_job.stdout)
    assert list(rows) == [project.lower()]
    assert rows[project.lower()][2:4] == ["closed", "16"]
    assert proc.poll() is None


# ---------------------------------------------------------------------- missing state


@pytest.mark.parametrize(
    "args",
    [("show",), ("retry", "3fa85f64-5717-4562-b3fc-2c963f66afa6"), ("abandon", "x", "--yes")],
)
def test_missing_state_dir_exits_4_and_creates_nothing(tmp_path: Path, args: tuple[str]) -> None:
    state = tmp_path / "nowhere" / "state"

    result = invoke(state, *args)

    assert result.exit_code == 4
    message = result.stderr.replace("\n", " ")
    assert f"no state here: {state} has no goflow state database (state.db; " in message
    assert "nothing was created" in message
    assert "pass --state-dir (or GOFLOW_STATE_DIR, or --config)" in message
    assert not (tmp_path / "nowhere").exists()


def test_existing_dir_without_database_exits_4_and_stays_empty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()

    for args in (("show",), ("show", "--json"), ("retry", "x"), ("abandon", "x", "--yes")):
        result = invoke(state, *args)
        assert result.exit_code == 4, args
        assert result.stdout == ""
        assert "no state here" in result.stderr
        assert list(state.iterdir()) == []


def test_a_mistyped_dir_suggests_the_sibling_that_has_state(tmp_path: Path) -> None:
    make_job(tmp_path / "state-prod")
    (tmp_path / "state-test").mkdir()  # no state: never suggested
    typo = tmp_path / "state-prd"

    result = invoke(typo, "show")

    assert result.exit_code == 4
    message = result.stderr.replace("\n", " ")
    assert f"did you mean --state-dir {(tmp_path / 'state-prod').resolve()}?" in message
    assert "state-test" not in message
    assert not typo.exists()


def test_the_parent_of_a_state_or_the_database_file_suggests_the_state(tmp_path: Path) -> None:
    state = tmp_path / "work" / "state"
    make_job(state)

    for given in (tmp_path / "work", state / "state.db"):
        result = invoke(given, "show")
        assert result.exit_code == 4, given
        assert f"did you mean --state-dir {state.resolve()}?" in result.stderr.replace("\n", " ")


def test_a_wrong_flag_suggests_the_configured_and_the_default_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "srv" / "goflow"
    make_job(configured)
    default = tmp_path / "home" / ".local" / "state" / "goflow-gpu"
    make_job(default)
    monkeypatch.setenv("GOFLOW_STATE_DIR", str(configured))
    (tmp_path / "elsewhere").mkdir()

    result = invoke(tmp_path / "elsewhere" / "x", "show")

    assert result.exit_code == 4
    assert (
        f"did you mean --state-dir {configured.resolve()}, or {default.resolve()}?"
        in result.stderr.replace("\n", " ")
    )


# ---------------------------------------------------------------------- retry


def test_retry_rearms_a_parked_job(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, parked=REASON)
    assert stored(state, pid)[1] == []

    result = invoke(state, "retry", pid)

    assert result.exit_code == 0, result.output
    assert (
        f"job {pid} re-armed: the next `goflow-gpu run`/`serve` resumes it; "
        "it re-sends the refused PUT" in result.stdout
    )
    assert REASON in result.stdout
    job, unfinished = stored(state, pid)
    assert unfinished == [pid]
    assert job.attention is None
    assert job.attention_at is None
    assert job.state == "open"


def test_retry_accepts_an_upper_case_id(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, parked=REASON)

    result = invoke(state, "retry", pid.upper())

    assert result.exit_code == 0, result.output
    assert f"job {pid} re-armed" in result.stdout
    assert stored(state, pid)[1] == [pid]


def test_retry_unknown_id_exits_2_naming_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, parked=REASON)
    unknown = "3fa85f64-5717-4562-b3fc-2c963f66afa6"

    result = invoke(state, "retry", unknown)

    assert result.exit_code == 2
    assert f"no job {unknown} in the state at {state.resolve()}" in result.stderr
    assert "goflow-gpu state show" in result.stderr
    assert stored(state, pid)[0].attention == REASON


def test_retry_closed_job_exits_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, closed="abandoned by operator: test")

    result = invoke(state, "retry", pid)

    assert result.exit_code == 2
    assert f"job {pid} is closed" in result.stderr
    assert "abandoned by operator: test" in result.stderr
    assert "nothing to retry" in result.stderr
    job, unfinished = stored(state, pid)
    assert (job.state, unfinished) == ("closed", [])


def test_retry_open_job_that_is_not_parked_exits_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state)

    result = invoke(state, "retry", pid)

    assert result.exit_code == 2
    assert f"job {pid} is open and not parked: nothing to retry" in result.stderr
    assert "resumes it by itself" in result.stderr
    assert stored(state, pid)[1] == [pid]


# ---------------------------------------------------------------------- abandon


def test_abandon_yes_closes_the_job_locally(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state)
    other = make_job(state)

    result = invoke(state, "abandon", pid.upper(), "--yes")

    assert result.exit_code == 0, result.output
    assert f"job {pid} abandoned" in result.stdout
    assert "Nothing was sent to the backend." in result.stdout
    assert "combinations: pending 5, ready 0, posting 0, reported 1, rejected 0" in result.stdout
    job, unfinished = stored(state, pid)
    assert job.state == "closed"
    assert job.closed_reason == "abandoned by operator: `goflow-gpu state abandon`"
    assert job.closed_at is not None
    assert job.report == "no" and job.status_completed == "no"
    assert unfinished == [other]


def test_abandon_parked_job_keeps_the_parking_reason_and_custom_reason(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, parked=REASON)

    result = invoke(state, "abandon", pid, "--yes", "--reason", "project archived")

    assert result.exit_code == 0, result.output
    job, unfinished = stored(state, pid)
    assert job.closed_reason == f"abandoned by operator: project archived (it was parked: {REASON})"
    assert unfinished == []
    with Store.open(state) as store:
        assert store.parked_jobs() == []


def test_abandon_declined_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state)

    result = invoke(state, "abandon", pid, input="n\n")

    assert result.exit_code == 1
    assert f"Abandon job {pid}?" in result.stdout
    assert f"job {pid} not abandoned: nothing changed" in result.stdout
    job, unfinished = stored(state, pid)
    assert (job.state, job.closed_reason, unfinished) == ("open", None, [pid])


def test_abandon_confirmed_by_answer_closes_the_job(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state)

    result = invoke(state, "abandon", pid, input="y\n")

    assert result.exit_code == 0, result.output
    assert stored(state, pid)[0].state == "closed"


def test_abandon_without_yes_and_without_input_refuses(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state)

    result = invoke(state, "abandon", pid)  # stdin at EOF: no answer possible

    assert result.exit_code == 2
    assert "pass --yes" in result.stderr
    assert stored(state, pid)[1] == [pid]


def test_abandon_unknown_id_exits_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_job(state)

    result = invoke(state, "abandon", "not-a-job", "--yes")

    assert result.exit_code == 2
    assert f"no job not-a-job in the state at {state.resolve()}" in result.stderr


def test_abandon_closed_job_exits_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state, closed=None)
    with Store.open(state) as store:
        store.close_job(pid)

    result = invoke(state, "abandon", pid, "--yes")

    assert result.exit_code == 2
    assert f"job {pid} is closed" in result.stderr
    assert "nothing to abandon" in result.stderr
    assert stored(state, pid)[0].closed_reason is None
