"""Logging: redaction, control-character escaping and correlation ids, read from real output."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from goflow_gpu.errors import ConfigError
from goflow_gpu.logs import (
    LIBRARY_LOG,
    adopt_library_handlers,
    bind,
    get_logger,
    parse_level,
    redact,
    register_secret,
    sanitize,
    set_cli_options,
    setup_logging,
)

SECRET = "made-up-secret-value-9876"


def test_redact_removes_registered_secret_headers_and_url_credentials() -> None:
    register_secret(SECRET)
    text = redact(
        f"key {SECRET}; X-API-Key: other-token; authorization=Bearer xyz; "
        "https://user:pw@example.com/x"
    )
    assert SECRET not in text
    assert "other-token" not in text
    assert "user:pw" not in text
    assert "https://***@example.com/x" in text
    assert redact("Authorization: Bearer sk-live-123456") == "Authorization: Bearer ***"


def test_sanitize_escapes_everything_that_could_forge_a_line() -> None:
    assert sanitize("a\nb") == "a\\nb"
    assert sanitize("\x1b[2J") == "\\x1b[2J"
    assert sanitize("x\ry") == "x\\x0dy"
    assert sanitize("p\u2028q") == "p\\u2028q"
    assert sanitize("tab\tstays") == "tab\tstays"


def test_json_lines_carry_correlation_ids_and_never_the_secret() -> None:
    register_secret(SECRET)
    stream = io.StringIO()
    setup_logging("json", "DEBUG", stream=stream)
    try:
        log = get_logger("goflow_gpu.test")
        with bind(project_id="p-1"), bind(media_id="m-1"):
            log.info("hello\nFAKE", detail=f"token={SECRET}", n=3)
        log.warning("outside")
    finally:
        setup_logging("json", "WARNING", stream=io.StringIO())
        logging.getLogger().setLevel(logging.WARNING)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "hello\\nFAKE"
    assert first["project_id"] == "p-1"
    assert first["media_id"] == "m-1"
    assert first["n"] == 3
    assert SECRET not in lines[0]
    assert "project_id" not in second


# -- the structlog pipeline: processors, context, renderers, routing ------------------------------


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def pipeline() -> Iterator[None]:
    """Leave logging as it was: handlers, root level, the CLI options, warnings capture."""
    yield
    set_cli_options()
    setup_logging("json", "WARNING", stream=io.StringIO())
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "goflow_handler", False):
            root.removeHandler(handler)
            handler.close()
    logging.captureWarnings(False)


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_registered_secret_is_redacted_in_messages_and_fields_of_every_logger(
    pipeline: None,
) -> None:
    secret = "made-up-key-for-redaction-5150"
    register_secret(secret)
    stream = io.StringIO()
    setup_logging("json", "INFO", stream=stream)
    get_logger("goflow_gpu.test").info(
        f"sent {secret}", header={"X-API-Key": secret}, urls=[f"https://u:{secret}@h/x"]
    )
    logging.getLogger("aiohttp.client").warning("retrying with key %s", secret)
    text = stream.getvalue()
    assert secret not in text
    ours, theirs = _json_lines(stream)
    assert ours["event"] == "sent ***"
    assert ours["header"] == {"X-API-Key": "***"}
    assert ours["urls"] == ["https://***@h/x"]
    assert theirs["event"] == "retrying with key ***"
    assert theirs["logger"] == "aiohttp.client"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_control_characters_are_escaped_in_message_fields_and_library_lines(
    pipeline: None, fmt: str
) -> None:
    stream = io.StringIO()
    setup_logging(fmt, "INFO", stream=stream)
    get_logger("goflow_gpu.test").info("name\nFORGED level=error", file="a\x1b[2Jb\rc")
    logging.getLogger("vllm.engine").warning("model\u2028x")
    text = stream.getvalue()
    for raw in ("\x1b", "\r", "\u2028"):
        assert raw not in text
    # JSON doubles the escaping backslash; the console shows it once.
    lines = [line.replace("\\\\", "\\") for line in text.splitlines()]
    assert len(lines) == 2  # the newline in the event did not make a third line
    assert "name\\nFORGED level=error" in lines[0]
    assert "a\\x1b[2Jb\\x0dc" in lines[0]
    assert "model\\u2028x" in lines[1]


def test_json_lines_start_with_ts_level_logger_event_then_ids_then_fields(pipeline: None) -> None:
    stream = io.StringIO()
    setup_logging("json", "DEBUG", stream=stream)
    with bind(project_id="p-9", media_id=None):
        get_logger("goflow_gpu.job").debug("job retrieved", media=2, analyses=3)
    (line,) = stream.getvalue().splitlines()
    payload = json.loads(line)
    assert list(payload) == ["ts", "level", "logger", "event", "project_id", "media", "analyses"]
    assert payload["level"] == "debug"
    assert payload["logger"] == "goflow_gpu.job"
    assert payload["ts"].endswith("Z") and payload["ts"][10] == "T"


def test_bound_ids_follow_each_asyncio_task_and_end_with_the_block(pipeline: None) -> None:
    stream = io.StringIO()
    setup_logging("json", "INFO", stream=stream)
    log = get_logger("goflow_gpu.test")

    async def combination(media: str, turns: int) -> None:
        with bind(media_id=media):
            for turn in range(turns):
                log.info("step", turn=turn)
                await asyncio.sleep(0)  # let the other task run in between

    async def job() -> None:
        with bind(project_id="p-1"):
            await asyncio.gather(combination("m-a", 3), combination("m-b", 3))
            log.info("job done")
        log.info("after the job")

    asyncio.run(job())
    lines = _json_lines(stream)
    steps = [(line["media_id"], line["turn"]) for line in lines if line["event"] == "step"]
    assert sorted(steps) == [("m-a", 0), ("m-a", 1), ("m-a", 2), ("m-b", 0), ("m-b", 1), ("m-b", 2)]
    assert steps[:2] == [("m-a", 0), ("m-b", 0)]  # really interleaved
    assert all(line["project_id"] == "p-1" for line in lines if line["event"] == "step")
    (done,) = [line for line in lines if line["event"] == "job done"]
    assert "media_id" not in done and done["project_id"] == "p-1"
    (after,) = [line for line in lines if line["event"] == "after the job"]
    assert "project_id" not in after


def test_our_records_keep_message_and_fields_for_caplog(
    pipeline: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="goflow_gpu"):
        get_logger("goflow_gpu.retry").info("retrying", attempt=2, delay_s=0.5)
    (record,) = caplog.records
    assert record.getMessage() == "retrying"
    assert record.goflow_fields == {"attempt": 2, "delay_s": 0.5}  # type: ignore[attr-defined]


def test_an_exception_is_logged_with_its_traceback_redacted(pipeline: None) -> None:
    secret = "made-up-key-in-a-traceback-77"
    register_secret(secret)
    stream = io.StringIO()
    setup_logging("json", "INFO", stream=stream)
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        get_logger("goflow_gpu.test").exception("qa could not check an answer", slug="x")
    (payload,) = _json_lines(stream)
    assert payload["level"] == "error"
    assert "ValueError: bad key ***" in payload["exception"]
    assert secret not in stream.getvalue()


def test_python_warnings_are_logged_through_the_pipeline(pipeline: None) -> None:
    stream = io.StringIO()
    setup_logging("json", "INFO", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings restored showwarning; capture again
        warnings.warn("a made-up deprecation", FutureWarning, stacklevel=1)
    (payload,) = _json_lines(stream)
    assert payload["logger"] == "py.warnings"
    assert payload["level"] == "warning"
    assert "FutureWarning: a made-up deprecation" in payload["event"]


def test_on_a_terminal_library_lines_go_to_a_file_announced_once(
    pipeline: None, tmp_path: Path
) -> None:
    screen = _Terminal()
    setup_logging("auto", "INFO", stream=screen, log_dir=tmp_path / "state")
    get_logger("goflow_gpu.job").info("job retrieved", media=1)
    logging.getLogger("vllm.config").info("Resolved architecture: Qwen2_5_VL")
    logging.getLogger("torch.distributed").warning("NUMA binding: using MEMBIND")
    get_logger("goflow_gpu.job").warning("analysis failed qa", slug="x")
    shown = screen.getvalue()
    library_file = tmp_path / "state" / LIBRARY_LOG
    assert "Resolved architecture" not in shown and "NUMA" not in shown
    assert "job retrieved" in shown and "analysis failed qa" in shown
    assert shown.count(str(library_file)) == 1  # the path, printed once
    kept = library_file.read_text()
    assert "Resolved architecture: Qwen2_5_VL" in kept and "[vllm.config]" in kept
    assert "NUMA binding" in kept
    assert "job retrieved" not in kept


def test_with_verbose_library_lines_stay_on_the_terminal_and_debug_shows(
    pipeline: None, tmp_path: Path
) -> None:
    set_cli_options(level="debug", verbose=True)
    screen = _Terminal()
    setup_logging("auto", "WARNING", stream=screen, log_dir=tmp_path)
    logging.getLogger("vllm.config").info("Resolved architecture")
    get_logger("goflow_gpu.job").debug("result reported")
    shown = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())  # a terminal gets colours
    assert "Resolved architecture" in shown and "[vllm.config]" in shown
    assert "result reported" in shown
    assert not (tmp_path / LIBRARY_LOG).exists()


def test_command_line_level_wins_over_the_settings_level(pipeline: None) -> None:
    set_cli_options(level="warning")
    stream = io.StringIO()
    setup_logging("json", "DEBUG", stream=stream)
    log = get_logger("goflow_gpu.test")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in _json_lines(stream)] == ["shown"]


def test_bad_levels_and_formats_are_configuration_errors_naming_the_source() -> None:
    with pytest.raises(ConfigError, match="GOFLOW_LOG_LEVEL 'verbose' is not a log level"):
        parse_level("verbose", "GOFLOW_LOG_LEVEL")
    with pytest.raises(ConfigError, match="--log-level"):
        set_cli_options(level="loud")
    with pytest.raises(ConfigError, match="log_format 'yaml'"):
        setup_logging("yaml", "INFO", stream=io.StringIO())
    assert parse_level("Warning") == logging.WARNING


def test_library_handlers_on_the_standard_streams_are_taken_off(pipeline: None) -> None:
    library = logging.getLogger("made_up_library")
    own_file = logging.NullHandler()
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.addHandler(own_file)
    library.propagate = False
    try:
        adopt_library_handlers()
        assert library.handlers == [own_file]
        assert library.propagate is True
    finally:
        library.handlers.clear()


def test_raw_writes_to_descriptor_2_become_log_lines_in_a_real_process(tmp_path: Path) -> None:
    """C++ warnings, child processes and progress bars write to fd 2 directly: captured."""
    script = tmp_path / "noisy.py"
    script.write_text(
        "import os, subprocess, sys\n"
        "from goflow_gpu.logs import StderrCapture, get_logger, setup_logging\n"
        "capture = StderrCapture()\n"
        "capture.start()\n"
        "setup_logging('json', 'INFO')\n"
        "get_logger('goflow_gpu.test').info('ours')\n"
        "os.write(2, b'W1130 cpp_extension.py:178] No CUDA runtime is found\\n')\n"
        "os.write(2, b'Loading shards: 0%\\rLoading shards: 100%\\n')\n"
        "subprocess.run([sys.executable, '-c', 'import sys; print(\"child\", file=sys.stderr)'])\n"
        "import logging\n"
        "library = logging.getLogger('made_up_library')\n"  # as torch does at import
        "library.addHandler(logging.StreamHandler())\n"
        "library.propagate = False\n"
        "library.warning('W1130 a warning at import time')\n"
        "print('the output')\n"
        "capture.stop()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "the output\n"
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("goflow_gpu.test", "ours"),
        ("stderr", "W1130 cpp_extension.py:178] No CUDA runtime is found"),
        ("stderr", "Loading shards: 100%"),
        ("stderr", "child"),
        ("stderr", "W1130 a warning at import time"),
    ]


def test_the_descriptor_2_file_is_emptied_once_read(tmp_path: Path) -> None:
    """A long `serve` must not grow the capture file forever: read lines are let go of."""
    script = tmp_path / "long.py"
    script.write_text(
        "import os, time\n"
        "from goflow_gpu.logs import StderrCapture, setup_logging\n"
        "capture = StderrCapture()\n"
        "capture.TRUNCATE_AT = 200\n"
        "capture.start()\n"
        "setup_logging('json', 'INFO')\n"
        "for i in range(3):\n"
        "    os.write(2, (f'line {i} ' + 'x' * 100 + '\\n').encode())\n"
        "    time.sleep(0.5)\n"
        "print(os.fstat(2).st_size)\n"
        "capture.stop()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    events = [json.loads(line)["event"] for line in done.stderr.splitlines()]
    assert [e.split()[:2] for e in events] == [["line", "0"], ["line", "1"], ["line", "2"]]
    assert int(done.stdout) < 200  # 3 x 108 bytes were written; the file was emptied
