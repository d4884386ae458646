"""``goflow-gpu config show``: every value with its source, secrets never printed.

Runs the real command in a subprocess (its own environment, a real YAML file, a real pty for the
terminal table); the API keys are made up.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from goflow_gpu.settings import Settings

KEY = "made-up-key-7f3a9c"  # what must never appear in any output


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GOFLOW_")}
    env.update(extra)
    return env


def _config_show(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goflow_gpu", "config", "show", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text("engine: transformers\nmodel: from-file\nqa_retries: 4\n")
    return path


def test_plain_text_names_each_source_and_hides_the_key(config: Path) -> None:
    done = _config_show(
        "-c", str(config), env=_env(GOFLOW_API_KEY=KEY, GOFLOW_MODEL="from-env", GOFLOW_SEED="9")
    )
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        name, value, source = re.split(r"\s{2,}", line.strip())
        rows[name] = (value, source)
    assert set(rows) == set(Settings.model_fields)  # every setting, one line each
    assert rows["api_key"] == ("set (not shown)", "env GOFLOW_API_KEY")
    assert rows["engine"] == ("transformers", f"file {config}")
    assert rows["qa_retries"] == ("4", f"file {config}")
    assert rows["model"] == ("from-env", "env GOFLOW_MODEL")  # env over file
    assert rows["seed"] == ("9", "env GOFLOW_SEED")
    assert rows["max_num_seqs"] == ("64", "default")
    assert rows["prompts_dir"] == ("(none)", "default")
    assert rows["keep_media"] == ("false", "default")
    # Aligned columns: every value, and every source, starts at the same offset.
    value_starts = {len(re.match(r"\S+\s+", line).group()) for line in done.stdout.splitlines()}  # type: ignore[union-attr]
    source_starts = {
        line.rindex("  " + rows[line.split()[0]][1]) for line in done.stdout.splitlines()
    }
    assert len(value_starts) == 1
    assert len(source_starts) == 1


def test_json_gives_value_and_source_per_setting(config: Path) -> None:
    done = _config_show(
        "--config", str(config), "--json", env=_env(GOFLOW_API_KEY=KEY, GOFLOW_DRAIN_TIMEOUT="5")
    )
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert list(shown) == list(Settings.model_fields)
    assert shown["api_key"] == {"value": "set (not shown)", "source": "env GOFLOW_API_KEY"}
    assert shown["model"] == {"value": "from-file", "source": f"file {config}"}
    assert shown["drain_timeout"] == {"value": 5.0, "source": "env GOFLOW_DRAIN_TIMEOUT"}
    assert shown["max_model_len"] == {"value": 16384, "source": "default"}
    assert shown["metrics_port"] == {"value": None, "source": "default"}


def test_without_a_key_or_a_file_everything_is_default() -> None:
    done = _config_show("--json", env=_env())
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["api_key"] == {"value": "not set", "source": "default"}
    assert {row["source"] for row in shown.values()} == {"default"}
    assert shown["engine"]["value"] == "vllm"


def test_a_password_in_a_url_is_masked() -> None:
    done = _config_show(
        "--json",
        env=_env(
            GOFLOW_API_KEY=KEY,
            GOFLOW_OPENAI_BASE_URL="http://operator:made-up-pw-55@127.0.0.1:8000/v1",
        ),
    )
    assert done.returncode == 0, done.stderr
    assert "made-up-pw-55" not in done.stdout
    assert json.loads(done.stdout)["openai_base_url"] == {
        "value": "http://operator:***@127.0.0.1:8000/v1",
        "source": "env GOFLOW_OPENAI_BASE_URL",
    }


def test_on_a_terminal_it_is_a_table(config: Path) -> None:
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "goflow_gpu", "config", "show", "-c", str(config)],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=_env(GOFLOW_API_KEY=KEY, COLUMNS="200", TERM="xterm"),
    ) as child:
        os.close(follower)  # the child holds its copy; ours would keep the pty open forever
        chunks = []
        while True:  # read while it writes: a pty buffers only a few KiB
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal, all is read
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        _, stderr = child.communicate(timeout=120)
    done = subprocess.CompletedProcess(child.args, child.returncode, "", stderr.decode())
    screen = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    assert done.returncode == 0, done.stderr
    assert KEY not in screen
    assert "settings (flag > env > file > default)" in screen
    assert re.search(r"│ api_key\s+│ set \(not shown\)\s+│ env GOFLOW_API_KEY\s+│", screen)
    assert re.search(rf"│ engine\s+│ transformers\s+│ file {re.escape(str(config))}\s+│", screen)


def test_a_mistyped_variable_is_refused_with_exit_2() -> None:
    done = _config_show(env=_env(GOFLOW_API_KEY=KEY, GOFLOW_STATEDIR="/tmp/x"))
    assert done.returncode == 2
    assert "GOFLOW_STATEDIR (did you mean GOFLOW_STATE_DIR?)" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert KEY not in done.stderr


def test_an_unknown_key_in_the_file_is_refused_with_its_name(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("drain_timout: 5\n")
    done = _config_show("-c", str(config), env=_env())
    assert done.returncode == 2
    assert str(config) in done.stderr
    assert "drain_timout: unknown setting (did you mean drain_timeout?)" in done.stderr
