"""Logging: redaction, control-character escaping and correlation ids, read from real output."""

from __future__ import annotations

import io
import json
import logging

from goflow_gpu.logs import bind, get_logger, redact, register_secret, sanitize, setup_logging

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
