"""The operator commands on the local state: ``state show``, ``state retry``, ``state abandon``.

Real SQLite state made through :class:`Store`; the CLI runs in-process through CliRunner.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from goflow_gpu.cli import app
from goflow_gpu.store import ComboKey, Store
from tests.test_store import body, manifest, plan

REASON = (
    "status PUT completed refused: 409 Conflict "
    '{"detail": "project [3fa8] is archived; no status change allowed", "code": "archived"}'
)


@pytest.fixture(autouse=True)
def _no_env_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # The commands must only see the --state-dir the tests pass.
    monkeypatch.delenv("GOFLOW_STATE_DIR", raising=False)


def invoke(state: Path, *args: str, input: str | None = None) -> Result:
    # Wide console: the table must not fold ids or states.
    return CliRunner().invoke(
        app,
        ["state", *args, "--state-dir", str(state)],
        input=input,
        env={"COLUMNS": "250"},
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


def stored(state: Path, pid: str) -> tuple[Any, list[str]]:
    with Store.open(state) as store:
        return store.job(pid), store.unfinished_jobs()


# ---------------------------------------------------------------------- show


def test_show_marks_parked_job_and_lists_its_full_reason_and_since(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = time.time()
    parked = make_job(state, parked=REASON)
    running = make_job(state)
    with Store.open(state) as store:
        job = store.job(parked)
        assert job is not None and job.attention_at is not None
        since = datetime.fromtimestamp(job.attention_at, UTC).isoformat(timespec="seconds")
    assert job.attention_at >= before - 1

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert "needs-attention" in rows[parked]
    assert "needs-attention" not in rows[running]
    assert " open " in rows[running]
    assert "Spring campaign" in rows[parked]
    assert "pending 5, reported 1" in rows[parked]
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


def test_show_without_parked_or_abandoned_jobs_prints_only_the_table(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pid = make_job(state)

    result = invoke(state, "show")

    assert result.exit_code == 0, result.output
    assert pid in result.stdout
    assert "need attention" not in result.stdout
    assert "closed without" not in result.stdout


# ---------------------------------------------------------------------- missing state


@pytest.mark.parametrize(
    "args",
    [("show",), ("retry", "3fa85f64-5717-4562-b3fc-2c963f66afa6"), ("abandon", "x", "--yes")],
)
def test_missing_state_dir_exits_2_and_creates_nothing(tmp_path: Path, args: tuple[str]) -> None:
    state = tmp_path / "nowhere" / "state"

    result = invoke(state, *args)

    assert result.exit_code == 2
    assert f"no state database at {state / 'state.db'}" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_existing_dir_without_database_exits_2_and_stays_empty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()

    result = invoke(state, "show")

    assert result.exit_code == 2
    assert "no state database at" in result.stderr
    assert list(state.iterdir()) == []


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
