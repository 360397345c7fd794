"""The canceller: a cancel request stops the job only on the daemon that runs it."""

from __future__ import annotations

import logging

import anyio
import pytest

from taskd.canceller import Canceller
from taskd.store import Store
from tests.builders import Q, new_job
from tests.support import ECHO, wait_until


async def test_a_request_cancels_the_job_where_it_runs_and_is_ignored_elsewhere(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    running, cancelled = {"here"}, []

    def cancel_local(job_id: str) -> bool:
        if job_id not in running:
            return False
        cancelled.append(job_id)
        return True

    canceller = Canceller(store=store, cancel_local=cancel_local)
    with caplog.at_level(logging.INFO, logger="taskd.canceller"):
        assert canceller.on_request("elsewhere") is False
        assert canceller.on_request("here") is True
    assert cancelled == ["here"]
    assert [r.getMessage() for r in caplog.records] == ["job here cancelled while running"]


async def test_cancelling_a_running_job_reaches_the_daemon_that_runs_it(store: Store) -> None:
    await store.enqueue(new_job())
    [running] = (await store.claim(Q, "me", 1, now=2, type_limits=ECHO)).jobs
    cancelled: list[str] = []

    def cancel_local(job_id: str) -> bool:
        cancelled.append(job_id)
        return True

    async def reached() -> bool:
        return cancelled == [running.id]

    async with anyio.create_task_group() as tg:
        await tg.start(Canceller(store=store, cancel_local=cancel_local).run)  # subscribed
        assert await store.cancel(Q, running.id, now=3) == "active"
        await wait_until(reached, "the cancel request to reach the canceller")
        tg.cancel_scope.cancel()
