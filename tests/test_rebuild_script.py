"""``scripts/rebuild-scene-model.sh``: the from-scratch rebuild of the tiny scene model.

The real stages train for hours on 2 cores; here a stand-in for ``goflow-gpu`` (the script's
``GOFLOW_GPU``) records each command and writes the folder, so the script's own logic is
checked: the first stage starts from random weights, every later one continues from the one
before, options given to the script reach every stage, and a rebuild stopped by a failing stage
goes on there when run again, redoing nothing finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "rebuild-scene-model.sh"

FAKE = """\
import os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as log:
    log.write(" ".join(args) + "\\n")
folder = Path(args[2])
folder.mkdir(parents=True, exist_ok=True)
if os.environ.get("FAIL_AT") == folder.name:
    sys.exit(3)
(folder / "training.json").write_text("{}")
"""


def _rebuild(tmp_path: Path, *options: str, fail_at: str = "") -> tuple[int, list[list[str]]]:
    fake = tmp_path / "fake_goflow.py"
    fake.write_text(FAKE)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = dict(os.environ, GOFLOW_GPU=f"{sys.executable} {fake}", CALLS=str(calls), FAIL_AT=fail_at)
    done = subprocess.run(
        ["bash", str(SCRIPT), "rebuild", *options],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, [line.split() for line in lines]


def _flag(call: list[str], name: str) -> str | None:
    return call[call.index(name) + 1] if name in call else None


def test_each_stage_continues_from_the_one_before_and_gets_the_script_s_options(
    tmp_path: Path,
) -> None:
    code, calls = _rebuild(tmp_path, "--device", "cuda")
    assert code == 0
    assert [call[:3] for call in calls] == [
        ["dev", "train-tiny", f"rebuild/s{n}"] for n in range(1, 6)
    ]
    assert _flag(calls[0], "--continue-from") is None  # from random weights
    assert [_flag(c, "--continue-from") for c in calls[1:]] == [
        f"rebuild/s{n}" for n in range(1, 5)
    ]
    assert all(_flag(c, "--device") == "cuda" for c in calls)
    assert [_flag(c, "--shapes") for c in calls] == ["1-1", "1-1", "1-2", None, None]
    assert _flag(calls[-1], "--layout-weight") == "0.4"


def test_a_stopped_rebuild_goes_on_at_the_stage_that_failed(tmp_path: Path) -> None:
    code, calls = _rebuild(tmp_path, fail_at="s3")
    assert code == 3
    assert [c[2] for c in calls] == ["rebuild/s1", "rebuild/s2", "rebuild/s3"]
    assert not (tmp_path / "rebuild" / "s3" / ".stage-command").exists()

    code, calls = _rebuild(tmp_path)
    assert code == 0
    assert [c[2] for c in calls] == ["rebuild/s3", "rebuild/s4", "rebuild/s5"]

    code, calls = _rebuild(tmp_path)  # all done: nothing runs
    assert (code, calls) == (0, [])


def test_other_options_redo_every_stage(tmp_path: Path) -> None:
    assert _rebuild(tmp_path)[0] == 0
    code, calls = _rebuild(tmp_path, "--seed", "1")
    assert code == 0
    assert [c[2] for c in calls] == [f"rebuild/s{n}" for n in range(1, 6)]
    assert all(_flag(c, "--seed") == "1" for c in calls)


def test_a_stage_redone_redoes_every_stage_after_it(tmp_path: Path) -> None:
    assert _rebuild(tmp_path)[0] == 0
    (tmp_path / "rebuild" / "s2" / ".stage-command").unlink()  # s2 lost: s3 was built on it
    code, calls = _rebuild(tmp_path)
    assert code == 0
    assert [c[2] for c in calls] == [f"rebuild/s{n}" for n in range(2, 6)]
