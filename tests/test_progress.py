"""Progress reports from Python handlers, shown by GET /jobs/ID while the job runs."""

from __future__ import annotations

import aiohttp
import pytest

from taskd.progress import report_progress
from tests import handler_funcs
from tests.support import base_url, get_json, make_config, post_json, running_daemon, wait_until


async def test_a_handler_reports_progress_while_it_runs(redis_url: str) -> None:
    handler_funcs.PROGRESS_GATE = handler_funcs.Gauge()
    handlers = {"long": {"python": "tests.handler_funcs:progressing"}}
    async with (
        running_daemon(make_config(redis_url, handlers=handlers)) as daemon,
        aiohttp.ClientSession() as session,
    ):
        url = base_url(daemon)
        _, job = await post_json(session, f"{url}/jobs", {"type": "long"})
        seen: dict[str, object] = {}

        async def reported() -> bool:
            nonlocal seen
            _, seen = await get_json(session, f"{url}/jobs/{job['id']}")
            return seen["progress"] is not None

        await wait_until(reported, "the first progress report")
        assert seen["state"] == "active"
        progress = seen["progress"]
        assert isinstance(progress, dict)
        assert (progress["value"], progress["message"]) == (50.0, "halfway there")

        handler_funcs.PROGRESS_GATE.gate.set()

        async def finished() -> bool:
            nonlocal seen
            _, seen = await get_json(session, f"{url}/jobs/{job['id']}")
            return seen["state"] == "completed"

        await wait_until(finished, "the job to complete")
    assert seen["progress"]["value"] == 100.0  # type: ignore[index]
    assert seen["result"] == "finished"


async def test_progress_outside_a_job_does_nothing_and_bad_values_are_refused() -> None:
    await report_progress(10, "nobody listens")
    with pytest.raises(ValueError, match="finite number"):
        await report_progress(float("nan"))
