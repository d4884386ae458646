"""The SQLite state store: real database files in tmp_path, real subprocesses for the lock.

Expected states and transitions are written out here by hand (not read from the module), so a
change to the state machine in the store has to be made on purpose in both places.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goflow_gpu.errors import StateError
from goflow_gpu.store import ComboKey, Outcomes, PlannedCombo, Store

REPO = Path(__file__).resolve().parents[1]

# The state machine as specified: (state, operation) -> new state. Anything else is illegal.
LEGAL = {
    ("pending", "attempt"): "pending",
    ("pending", "ready_completed"): "ready",
    ("pending", "ready_failed"): "ready",
    ("ready", "posting"): "posting",
    ("posting", "posting"): "posting",
    ("posting", "reported"): "reported",
    ("posting", "rejected"): "rejected",
}
OPERATIONS = ("attempt", "ready_completed", "ready_failed", "posting", "reported", "rejected")
# How to bring a fresh combination into each state.
PATHS = {
    "pending": [],
    "ready": ["ready_completed"],
    "posting": ["ready_completed", "posting"],
    "reported": ["ready_completed", "posting", "reported"],
    "rejected": ["ready_completed", "posting", "rejected"],
}


def manifest(n_media: int = 2, n_analyses: int = 3) -> dict[str, Any]:
    return {
        "client": {"id": str(uuid.uuid4()), "slug": "c", "name": "Client"},
        "project": {"id": str(uuid.uuid4()), "slug": "p", "name": "Project"},
        "media": [
            {
                "id": str(uuid.uuid4()),
                "filename": f"m{i}.jpg",
                "optimised_path": f"https://img.example/{i}.jpg",
                "greyscale_path": f"https://img.example/{i}-g.jpg",
            }
            for i in range(n_media)
        ],
        "analyses": [
            {"id": str(uuid.uuid4()), "name": f"A{j}", "slug": f"a-{j}"} for j in range(n_analyses)
        ],
        "extra_field": {"kept": True},
    }


def plan(raw: dict[str, Any]) -> list[PlannedCombo]:
    return [
        PlannedCombo(
            media_id=m["id"],
            analysis_id=a["id"],
            slug=a["slug"],
            variant="optimised",
            system_prompt="You are careful.",
            user_prompt=f"Do {a['slug']}.",
            json_schema={"type": "object", "properties": {"x": {"type": "integer"}}},
            spec_version=3,
            max_tokens=256,
            temperature=0.0,
            qa_rules={"min_items": 1},
        )
        for m in raw["media"]
        for a in raw["analyses"]
    ]


def body(status: str) -> dict[str, Any]:
    return {
        "modelUsed": "qwen2.5vl",
        "userPromptUsed": "u",
        "systemPromptUsed": "s",
        "status": status,
        "analysisResult": {"x": 1},
    }


def first_key(raw: dict[str, Any]) -> ComboKey:
    return ComboKey(raw["project"]["id"], raw["media"][0]["id"], raw["analyses"][0]["id"])


def apply(store: Store, key: ComboKey, op: str) -> None:
    if op == "attempt":
        store.record_attempt(key, ["schema: x missing"])
    elif op == "ready_completed":
        store.mark_ready(key, body("completed"), "completed", {"inference_seconds": 0.5})
    elif op == "ready_failed":
        store.mark_ready(key, body("failed"), "failed")
    elif op == "posting":
        store.mark_posting(key)
    elif op == "reported":
        store.mark_reported(key, 201)
    elif op == "rejected":
        store.mark_rejected(key, 422, "analysisResult: field required")
    else:  # pragma: no cover - test table typo
        raise AssertionError(op)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(tmp_path / "state") as s:
        yield s


@pytest.fixture
def job(store: Store) -> dict[str, Any]:
    raw = manifest()
    store.create_job(raw, plan(raw))
    return raw


# ---------------------------------------------------------------------- opening and migrations


def test_open_creates_wal_database_with_migrations(tmp_path: Path) -> None:
    state = tmp_path / "nested" / "state"
    with Store.open(state) as s:
        assert s.path == state.resolve() / "state.db"
    raw = sqlite3.connect(state / "state.db")
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT id, name FROM schema_migrations").fetchall() == [
            (1, "initial"),
            (2, "needs-attention"),
        ]
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "combos", "media", "rejected_manifests"} <= tables
    finally:
        raw.close()


def test_reopen_keeps_data_and_does_not_rerun_migrations(tmp_path: Path) -> None:
    raw = manifest()
    with Store.open(tmp_path) as s:
        s.create_job(raw, plan(raw))
        s.mark_ready(first_key(raw), body("completed"), "completed")
    db = sqlite3.connect(tmp_path / "state.db")
    applied_before = db.execute("SELECT * FROM schema_migrations").fetchall()
    db.close()
    with Store.open(tmp_path) as s:
        assert s.combo(first_key(raw)).state == "ready"
        assert s.job(raw["project"]["id"]) is not None
    with Store.open(tmp_path):
        pass
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("SELECT * FROM schema_migrations").fetchall() == applied_before
    db.close()


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("INSERT INTO schema_migrations VALUES (99, 'from-the-future', 0)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match=r"migration 99 .*newer"):
        Store.open(tmp_path)


def test_file_that_is_not_sqlite_is_refused_and_left_untouched(tmp_path: Path) -> None:
    content = b"these are my holiday notes, not a database\n" * 50
    (tmp_path / "state.db").write_bytes(content)
    with pytest.raises(StateError, match=r"state\.db is not a SQLite database"):
        Store.open(tmp_path)
    assert (tmp_path / "state.db").read_bytes() == content
    # The lock was released: the next attempt is refused for the same reason, not "in use".
    with pytest.raises(StateError, match="not a SQLite database"):
        Store.open(tmp_path)


def test_corrupt_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    raw = manifest(4, 5)
    with Store.open(tmp_path) as s:
        s.create_job(raw, plan(raw))
    db = tmp_path / "state.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 8192
    # Keep the 100-byte header (so it still looks like SQLite) and wreck every page after it.
    data[100:] = bytes((i * 7 + 3) % 256 for i in range(len(data) - 100))
    db.write_bytes(bytes(data))
    for extra in ("state.db-wal", "state.db-shm"):
        (tmp_path / extra).unlink(missing_ok=True)
    with pytest.raises(StateError, match=r"state\.db (is corrupt|cannot be used)"):
        Store.open(tmp_path)
    assert db.read_bytes() == bytes(data)


def test_state_dir_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StateError, match=r"cannot create state directory .*not-a-dir/state"):
        Store.open(blocker / "state")


def _open_as_nobody(state: Path) -> str:
    """Store.open in a forked child that dropped root; returns what it reported."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(read_fd)
            os.setgid(65534)
            os.setuid(65534)
            try:
                Store.open(state).close()
                message = "OPENED"
            except StateError as exc:
                message = f"STATE_ERROR {exc}"
            os.write(write_fd, message.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_read_only_state_dir_is_refused_naming_it() -> None:
    # root ignores permission bits, so as root the check runs in a forked child as "nobody".
    base = Path(tempfile.mkdtemp(prefix="goflow-ro-"))
    state = base / "state"
    try:
        base.chmod(0o755)
        state.mkdir()
        state.chmod(0o555)
        if os.geteuid() == 0:
            message = _open_as_nobody(state)
            assert message.startswith("STATE_ERROR"), message
        else:
            with pytest.raises(StateError) as info:
                Store.open(state)
            message = str(info.value)
        assert f"state directory {state} is not writable" in message
        assert list(state.iterdir()) == []
    finally:
        state.chmod(0o755)
        for child in state.iterdir():
            child.unlink()
        state.rmdir()
        base.rmdir()


def test_disk_full_is_a_state_error_and_the_job_is_not_half_stored(store: Store) -> None:
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    # A database that may not grow behaves exactly like a full disk (SQLITE_FULL).
    store.conn.execute(f"PRAGMA max_page_count = {pages + 1}")
    raw = manifest(20, 25)
    with pytest.raises(StateError, match="full"):
        store.create_job(raw, plan(raw))
    assert store.job(raw["project"]["id"]) is None
    assert store.combos(raw["project"]["id"]) == []


# ---------------------------------------------------------------------- the directory lock

LOCK_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from goflow_gpu.store import Store
    store = Store.open(Path(sys.argv[1]))
    print("LOCKED", flush=True)
    sys.stdin.readline()
    store.close()
    print("RELEASED", flush=True)
    """
)


def test_second_store_in_process_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = Store.open(tmp_path)
    with pytest.raises(StateError) as info:
        Store.open(tmp_path)
    assert str(info.value) == (
        f"state directory {tmp_path.resolve()} is in use by another worker (pid {os.getpid()})"
    )
    first.close()
    with Store.open(tmp_path) as second:
        assert second.jobs() == []


def _lock_child(state: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", LOCK_CHILD, str(state)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "LOCKED"
    return child


def test_lock_held_by_another_process_names_its_pid(tmp_path: Path) -> None:
    child = _lock_child(tmp_path)
    try:
        with pytest.raises(StateError, match=rf"in use by another worker \(pid {child.pid}\)"):
            Store.open(tmp_path)
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "RELEASED"
        assert child.wait(timeout=30) == 0
        with Store.open(tmp_path) as s:
            assert s.unfinished_jobs() == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_lock_of_a_killed_worker_is_released(tmp_path: Path) -> None:
    child = _lock_child(tmp_path)
    with pytest.raises(StateError, match="in use by another worker"):
        Store.open(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    with Store.open(tmp_path) as s:
        assert s.jobs() == []


# ---------------------------------------------------------------------- jobs


def test_create_job_stores_manifest_and_pending_combos_in_order(store: Store) -> None:
    raw = manifest(2, 3)
    store.create_job(raw, plan(raw))
    pid = raw["project"]["id"]
    job = store.job(pid)
    assert job is not None
    assert job.manifest == raw
    assert (job.state, job.status_processing, job.status_completed, job.report) == (
        "open",
        "no",
        "no",
        "no",
    )
    assert job.closed_at is None
    assert job.report_body is None
    rows = store.combos(pid)
    expected_order = [(m["id"], a["id"]) for m in raw["media"] for a in raw["analyses"]]
    assert [(r.key.media_id, r.key.analysis_id) for r in rows] == expected_order
    first = rows[0]
    assert first.state == "pending"
    assert first.attempts == 0
    assert first.reasons == []
    # The row carries the plan it was stored with, whole: the same PlannedCombo comes back.
    assert [r.plan for r in rows] == plan(raw)
    assert first.plan.json_schema == {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert first.plan.qa_rules == {"min_items": 1}
    assert (first.plan.spec_version, first.plan.max_tokens) == (3, 256)
    assert first.body is None
    assert first.post_attempts == 0
    assert store.counts(pid) == {
        "pending": 6,
        "ready": 0,
        "posting": 0,
        "reported": 0,
        "rejected": 0,
    }
    assert store.unfinished_jobs() == [pid]


def test_create_job_twice_is_refused(store: Store, job: dict[str, Any]) -> None:
    with pytest.raises(StateError, match="already exists"):
        store.create_job(job, plan(job))
    assert len(store.combos(job["project"]["id"])) == 6


def test_create_job_is_atomic(store: Store) -> None:
    raw = manifest(3, 3)
    combos = plan(raw)
    combos.append(combos[4])  # the same combination twice: the last insert fails
    with pytest.raises(StateError, match="create job"):
        store.create_job(raw, combos)
    assert store.job(raw["project"]["id"]) is None
    assert store.combos(raw["project"]["id"]) == []
    assert store.jobs() == []
    # And the same job can then be created properly.
    store.create_job(raw, plan(raw))
    assert len(store.combos(raw["project"]["id"])) == 9


def test_create_job_without_project_id_is_refused(store: Store) -> None:
    with pytest.raises(StateError, match=r"no project\.id"):
        store.create_job({"project": {}}, [])


def test_unfinished_jobs_oldest_first_and_closed_ones_left_out(store: Store) -> None:
    raws = [manifest(1, 1) for _ in range(3)]
    for raw in raws:
        store.create_job(raw, plan(raw))
    ids = [r["project"]["id"] for r in raws]
    assert store.unfinished_jobs() == ids
    store.close_job(ids[1])
    assert store.unfinished_jobs() == [ids[0], ids[2]]
    assert [j.project_id for j in store.jobs()] == ids
    closed = store.job(ids[1])
    assert closed is not None
    assert closed.state == "closed"
    assert closed.closed_at is not None
    with pytest.raises(StateError, match="already closed"):
        store.close_job(ids[1])
    with pytest.raises(StateError, match="unknown job"):
        store.close_job(str(uuid.uuid4()))


def test_rejected_manifests_are_kept_for_inspection(store: Store) -> None:
    first = store.record_rejected_manifest({"project": {"id": "not-a-uuid"}}, "project.id: bad")
    second = store.record_rejected_manifest("<html>oops</html>", "manifest must be an object")
    third = store.record_rejected_manifest({1, 2}, "not JSON at all")
    assert first < second < third
    kept = store.rejected_manifests()
    assert [(k["raw"], k["error"]) for k in kept] == [
        ({"project": {"id": "not-a-uuid"}}, "project.id: bad"),
        ("<html>oops</html>", "manifest must be an object"),
        ("{1, 2}", "not JSON at all"),
    ]


# ---------------------------------------------------------------------- statuses and report


def _finish_all(store: Store, pid: str) -> None:
    for row in store.combos(pid):
        store.mark_ready(row.key, body("completed"), "completed")
        store.mark_posting(row.key)
        store.mark_reported(row.key, 201)


def test_statuses_and_report_in_order_once(store: Store, job: dict[str, Any]) -> None:
    pid = job["project"]["id"]
    with pytest.raises(StateError, match="without an intent"):
        store.mark_status(pid, "processing", "sent")
    store.mark_status(pid, "processing", "intent")
    store.mark_status(pid, "processing", "intent")  # re-sent after a crash: allowed
    store.mark_status(pid, "processing", "sent")
    with pytest.raises(StateError, match="already sent"):
        store.mark_status(pid, "processing", "intent")
    with pytest.raises(StateError, match="6 combinations are not reported"):
        store.mark_status(pid, "completed", "intent")
    with pytest.raises(StateError, match="before status completed"):
        store.mark_report(pid, "intent", {"type": "quality_analysis"})
    _finish_all(store, pid)
    store.mark_status(pid, "completed", "intent")
    store.mark_status(pid, "completed", "sent")
    with pytest.raises(StateError, match="already sent"):
        store.mark_status(pid, "completed", "intent")
    with pytest.raises(StateError, match="needs the report body"):
        store.mark_report(pid, "intent")
    store.mark_report(pid, "intent", {"type": "quality_analysis", "n": 1})
    store.mark_report(pid, "intent")  # re-sent after a crash: the stored body is kept
    j = store.job(pid)
    assert j is not None
    assert (j.report, j.report_body) == ("intent", {"type": "quality_analysis", "n": 1})
    store.mark_report(pid, "sent")
    with pytest.raises(StateError, match="already sent"):
        store.mark_report(pid, "intent", {"type": "quality_analysis"})
    j = store.job(pid)
    assert j is not None
    assert (j.status_processing, j.status_completed, j.report) == ("sent", "sent", "sent")


def test_completed_needs_processing_sent(store: Store, job: dict[str, Any]) -> None:
    pid = job["project"]["id"]
    _finish_all(store, pid)
    with pytest.raises(StateError, match="before status processing was sent"):
        store.mark_status(pid, "completed", "intent")


def test_bad_status_phase_and_unknown_job(store: Store, job: dict[str, Any]) -> None:
    pid = job["project"]["id"]
    with pytest.raises(StateError, match="unknown project status"):
        store.mark_status(pid, "done", "intent")
    with pytest.raises(StateError, match="unknown phase"):
        store.mark_status(pid, "processing", "maybe")
    with pytest.raises(StateError, match="unknown job"):
        store.mark_status(str(uuid.uuid4()), "processing", "intent")


# ---------------------------------------------------------------------- combinations


def test_attempts_metrics_and_the_completed_path(store: Store, job: dict[str, Any]) -> None:
    key = first_key(job)
    assert store.record_attempt(key, ["schema: x missing"]) == 1
    assert store.record_attempt(key, ["qa: empty", "qa: too short"], {"prompt_tokens": 90}) == 2
    store.mark_ready(
        key,
        body("completed"),
        "completed",
        {
            "inference_seconds": 1.25,
            "prompt_tokens": 100,
            "cached_tokens": 60,
            "generated_tokens": 7,
        },
    )
    store.mark_posting(key)
    store.mark_posting(key)  # restart with the outcome unknown: a second intent
    store.mark_reported(key, 400, "duplicate after unknown outcome")
    row = store.combo(key)
    assert row.state == "reported"
    assert row.attempts == 2
    assert row.reasons == [["schema: x missing"], ["qa: empty", "qa: too short"]]
    assert row.body == body("completed")
    assert row.result_status == "completed"
    assert row.post_attempts == 2
    assert (row.http_status, row.server_detail) == (400, "duplicate after unknown outcome")
    assert (row.inference_seconds, row.prompt_tokens, row.cached_tokens) == (1.25, 100, 60)
    assert row.generated_tokens == 7
    counts = store.counts(job["project"]["id"])
    assert (counts["reported"], counts["pending"]) == (1, 5)
    assert [r.key for r in store.combos(job["project"]["id"], states=["reported"])] == [key]


def test_rejected_keeps_the_server_detail(store: Store, job: dict[str, Any]) -> None:
    key = first_key(job)
    store.mark_ready(key, body("failed"), "failed")
    store.mark_posting(key)
    store.mark_rejected(key, 422, "analysisResult.x: not an integer")
    row = store.combo(key)
    assert (row.state, row.http_status, row.server_detail) == (
        "rejected",
        422,
        "analysisResult.x: not an integer",
    )
    assert row.result_status == "failed"


def test_outcomes_count_completed_failed_and_left_one_way(
    store: Store, job: dict[str, Any]
) -> None:
    pid = job["project"]["id"]
    keys = [r.key for r in store.combos(pid)]  # 2 media x 3 analyses
    steps = [
        ["ready_completed", "posting", "reported"],  # completed: the backend holds it
        ["ready_failed", "posting", "reported"],  # failed: QA gave up, the failure landed
        ["ready_completed", "posting", "rejected"],  # failed: the backend refused the result
        ["ready_completed", "posting"],  # left: sent, outcome not known yet
        ["ready_completed"],  # left
        [],  # left: pending
    ]
    for key, ops in zip(keys, steps, strict=True):
        for op in ops:
            apply(store, key, op)
    expected = Outcomes(completed=1, failed=2, left=3)
    assert store.outcomes(pid) == expected  # counted in SQL
    rows = store.combos(pid)
    assert Outcomes.of_rows(rows) == expected  # counted from loaded rows, the same way
    assert expected.total == 6
    assert [r.outcome for r in rows] == ["completed", "failed", "failed", "left", "left", "left"]
    assert [r.passed for r in rows] == [True, False, False, False, False, False]
    assert store.outcomes(str(uuid.uuid4())) == Outcomes()  # an unknown job: nothing


@pytest.mark.parametrize("state", list(PATHS))
@pytest.mark.parametrize("op", OPERATIONS)
def test_every_transition_legal_or_refused(
    store: Store, job: dict[str, Any], state: str, op: str
) -> None:
    key = first_key(job)
    for step in PATHS[state]:
        apply(store, key, step)
    before = store.combo(key)
    assert before.state == state
    if (state, op) in LEGAL:
        apply(store, key, op)
        assert store.combo(key).state == LEGAL[(state, op)]
    else:
        with pytest.raises(StateError, match="illegal transition"):
            apply(store, key, op)
        assert store.combo(key) == before


def test_mark_ready_checks_the_body_status(store: Store, job: dict[str, Any]) -> None:
    key = first_key(job)
    with pytest.raises(StateError, match="body status"):
        store.mark_ready(key, body("completed"), "failed")
    with pytest.raises(StateError, match="completed or failed"):
        store.mark_ready(key, body("done"), "done")
    with pytest.raises(StateError, match="unknown metrics"):
        store.mark_ready(key, body("completed"), "completed", {"gpu_watts": 300})
    assert store.combo(key).state == "pending"


def test_unknown_combination_is_refused(store: Store, job: dict[str, Any]) -> None:
    stranger = ComboKey(job["project"]["id"], str(uuid.uuid4()), job["analyses"][0]["id"])
    with pytest.raises(StateError, match="not part of a stored job"):
        store.combo(stranger)
    with pytest.raises(StateError, match="not part of a stored job"):
        store.mark_posting(stranger)
    with pytest.raises(StateError, match="unknown combination state"):
        store.combos(job["project"]["id"], states=["finished"])


def test_no_posting_on_a_closed_job(store: Store, job: dict[str, Any]) -> None:
    key = first_key(job)
    store.mark_ready(key, body("completed"), "completed")
    store.close_job(key.project_id)
    with pytest.raises(StateError, match="is closed"):
        store.mark_posting(key)
    assert store.combo(key).state == "ready"


def test_bad_http_status_is_refused(store: Store, job: dict[str, Any]) -> None:
    key = first_key(job)
    for step in PATHS["posting"]:
        apply(store, key, step)
    with pytest.raises(StateError, match="not an HTTP status"):
        store.mark_reported(key, 0)
    assert store.combo(key).state == "posting"


# ---------------------------------------------------------------------- media cache


def test_media_rows_and_download_counter(store: Store) -> None:
    pid, mid = str(uuid.uuid4()), str(uuid.uuid4())
    path = store.media_path(pid, mid, "greyscale")
    assert path == store.path.parent / "media" / pid / f"{mid}-greyscale"
    assert store.media(pid, mid, "greyscale") is None
    assert store.downloads(pid) == 0
    store.record_media_error(pid, mid, "greyscale", "http://x/a.jpg: HTTP 404 Not Found")
    err = store.media(pid, mid, "greyscale")
    assert err is not None
    assert (err.ok, err.error, err.path) == (False, "http://x/a.jpg: HTTP 404 Not Found", None)
    assert store.downloads(pid) == 0
    store.record_media(pid, mid, "greyscale", path=path, size=(64, 48), nbytes=1234, sha256="ab")
    store.record_media(pid, mid, "optimised", path=path, size=(64, 48), nbytes=1234, sha256="cd")
    ok = store.media(pid, mid, "greyscale")
    assert ok is not None
    assert (ok.ok, ok.path, ok.width, ok.height, ok.nbytes, ok.sha256, ok.error) == (
        True,
        path,
        64,
        48,
        1234,
        "ab",
        None,
    )
    assert store.downloads(pid) == 2
    assert store.downloads(str(uuid.uuid4())) == 0


@pytest.mark.parametrize(
    ("project", "media_id", "variant"),
    [("../etc", "m", "v"), ("p", "a/b", "v"), ("p", "m", ".."), ("p", "", "v")],
)
def test_media_path_refuses_names_that_escape(
    store: Store, project: str, media_id: str, variant: str
) -> None:
    with pytest.raises(StateError, match="cannot be used in a file name"):
        store.media_path(project, media_id, variant)


# ---------------------------------------------------------------------- property


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.sampled_from([*OPERATIONS, "reopen"]), min_size=1, max_size=14))
def test_random_operations_stay_in_the_state_machine(ops: list[str]) -> None:
    raw = manifest(1, 1)
    key = first_key(raw)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp))
        try:
            store.create_job(raw, plan(raw))
            reached_reported = 0
            posting_intents = 0
            for op in ops:
                if op == "reopen":  # a restart between any two steps
                    store.close()
                    store = Store.open(Path(tmp))
                    continue
                before = store.combo(key)
                try:
                    apply(store, key, op)
                except StateError:
                    assert (before.state, op) not in LEGAL
                    assert store.combo(key) == before
                    continue
                after = store.combo(key)
                assert (before.state, op) in LEGAL
                assert after.state == LEGAL[(before.state, op)]
                if op == "posting":
                    posting_intents += 1
                if after.state == "reported":
                    reached_reported += 1
                assert reached_reported <= 1
                assert after.post_attempts == posting_intents
                if after.state != "pending":
                    assert after.body is not None
                if after.state in ("reported", "rejected"):
                    assert after.post_attempts >= 1
        finally:
            store.close()


def test_json_columns_survive_unicode(store: Store) -> None:
    raw = manifest(1, 1)
    raw["project"]["name"] = "Café\n\x1b[31mred"
    store.create_job(raw, plan(raw))
    job = store.job(raw["project"]["id"])
    assert job is not None
    assert job.manifest["project"]["name"] == "Café\n\x1b[31mred"
    reader = sqlite3.connect(store.path)
    try:
        stored = reader.execute("SELECT manifest FROM jobs").fetchone()[0]
    finally:
        reader.close()
    assert json.loads(stored) == raw


# ---------------------------------------------------------------------- off the loop, in groups


def _committed_states(path: Path) -> dict[str, str]:
    """States as another connection sees them: only what was committed."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT media_id || ':' || analysis_id, state FROM combos"))
    finally:
        conn.close()


def test_run_resumes_after_the_change_is_committed(store: Store, job: dict[str, Any]) -> None:
    key = first_key(job)
    name = f"{key.media_id}:{key.analysis_id}"

    async def main() -> None:
        await store.run(store.mark_ready, key, body("completed"), "completed")
        assert _committed_states(store.path)[name] == "ready"
        await store.run(store.mark_posting, key)
        assert _committed_states(store.path)[name] == "posting"
        row = await store.run(store.combo, key)
        assert row.state == "posting" and row.post_attempts == 1

    asyncio.run(main())


def test_changes_queued_together_share_commits(store: Store) -> None:
    raw = manifest(n_media=6, n_analyses=5)
    store.create_job(raw, plan(raw))
    keys = [
        ComboKey(raw["project"]["id"], m["id"], a["id"])
        for m in raw["media"]
        for a in raw["analyses"]
    ]

    async def one(key: ComboKey) -> None:
        await store.run(store.mark_ready, key, body("failed"), "failed")
        await store.run(store.mark_posting, key)
        await store.run(store.mark_reported, key, 201)

    async def main() -> None:
        await asyncio.gather(*(one(k) for k in keys))

    asyncio.run(main())
    commits, calls = store.group_stats
    assert calls == 3 * len(keys) == 90
    assert commits < calls  # 30 tasks queue their changes while the writer commits
    assert set(_committed_states(store.path).values()) == {"reported"}


def test_a_refused_change_in_a_group_fails_only_its_caller(
    store: Store, job: dict[str, Any]
) -> None:
    pid = job["project"]["id"]
    first, second = (ComboKey(pid, m["id"], job["analyses"][0]["id"]) for m in job["media"])

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(
                store.run(store.mark_ready, first, body("completed"), "completed"),
                store.run(store.mark_reported, second, 201),  # pending -> reported: illegal
                store.run(store.mark_ready, second, body("failed"), "failed"),
                return_exceptions=True,
            )
        )

    outcomes = asyncio.run(main())
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], StateError)
    states = _committed_states(store.path)
    assert states[f"{first.media_id}:{first.analysis_id}"] == "ready"
    assert states[f"{second.media_id}:{second.analysis_id}"] == "ready"


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    raw = manifest()
    store = Store.open(tmp_path / "state")
    store.create_job(raw, plan(raw))
    key = first_key(raw)

    async def main() -> None:
        # Queued, not awaited: close() must still commit it before the connection goes.
        pending = asyncio.ensure_future(store.run(store.mark_ready, key, body("failed"), "failed"))
        await asyncio.sleep(0)
        store.close()
        await pending

    asyncio.run(main())
    assert _committed_states(tmp_path / "state" / "state.db")[
        f"{key.media_id}:{key.analysis_id}"
    ] == ("ready")
