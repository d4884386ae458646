"""Against a real staging backend, on demand only: ``pytest -m live`` with
GOFLOW_LIVE_BASE_URL and GOFLOW_API_KEY set. Never part of CI (deselected in pyproject), and it
never calls next-job: that would take a job it would not finish.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from pydantic import SecretStr

from goflow_gpu.client import GoFlowClient
from goflow_gpu.errors import NotFoundError

pytestmark = pytest.mark.live

BASE = os.environ.get("GOFLOW_LIVE_BASE_URL")
KEY = os.environ.get("GOFLOW_API_KEY")


@pytest.fixture
def live_client() -> GoFlowClient:
    if not BASE or not KEY:
        pytest.fail("live tests need GOFLOW_LIVE_BASE_URL and GOFLOW_API_KEY")
    return GoFlowClient(BASE, SecretStr(KEY))


def test_backend_reachable(live_client: GoFlowClient) -> None:
    async def go() -> float:
        async with live_client as client:
            return await client.ping()

    assert asyncio.run(go()) >= 0


def test_unknown_project_status_is_404_not_401(live_client: GoFlowClient) -> None:
    """Proves the key is accepted without touching a real project."""

    async def go() -> None:
        async with live_client as client:
            await client.set_status("00000000-0000-4000-8000-000000000000", "processing")

    with pytest.raises(NotFoundError):
        asyncio.run(go())
