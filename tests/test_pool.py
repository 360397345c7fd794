"""The worker pool on its own: a job keeps its slot until its outcome is recorded, and an
attempt cut short (timeout, cancel, stop) ends its exec handler's program first."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from taskd.handlers import Handlers
from taskd.metrics import Metrics
from taskd.store import Attempt, Claimed, ClaimRequest, Store
from taskd.workers import WorkerPool
from tests.builders import Q, enqueue, stored
from tests.support import REPO, is_gone, make_config, read_pids, wait_until

ME = "pool-test"


class HeldAcks(Store):
    """A store whose acks wait for the test to let them through, then go to Redis."""

    def __init__(self, store: Store) -> None:
        super().__init__(connection=store.connection)
        self.through = anyio.Event()
        self.waiting = 0

    async def ack(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> list[bool]:
        self.waiting += len(attempts)
        await self.through.wait()
        return await super().ack(queue, daemon_id, attempts, now)

    async def ack_and_claim(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], request: ClaimRequest
    ) -> tuple[list[bool], Claimed]:
        self.waiting += len(attempts)
        await self.through.wait()
        return await super().ack_and_claim(queue, daemon_id, attempts, request)


@asynccontextmanager
async def running_pool(
    store: Store,
    redis_url: str,
    concurrency: int,
    queues: Sequence[str] = (Q,),
    **handlers: Mapping[str, Any],
) -> AsyncIterator[WorkerPool]:
    workers = {"concurrency": concurrency, "queues": list(queues)}
    config = make_config(redis_url, workers=workers, handlers=handlers)
    async with Handlers(config.handlers) as runners, anyio.create_task_group() as tg:
        pool = WorkerPool(
            store=store,
            handlers=runners,
            handler_configs=config.handlers,
            daemon_id=ME,
            queues=queues,
            concurrency=concurrency,
            metrics=Metrics(concurrency=concurrency),
        )
        await tg.start(pool.run)
        yield pool
        await pool.drain(5)


@pytest.mark.timeout(30)
async def test_a_job_waiting_for_its_ack_keeps_its_slot(store: Store, redis_url: str) -> None:
    held = HeldAcks(store)
    await enqueue(store, 10)
    async with running_pool(held, redis_url, concurrency=2) as pool:
        # No ack gets through: the first two jobs ran, and no third was claimed, so that
        # a crash now would give back at most as many jobs as the daemon has slots.
        await wait_until(lambda: _holds(lambda: held.waiting >= 1), "an ack on its way")
        await anyio.sleep(0.3)  # time for a claim that should not happen
        assert await _active(store) == 2
        assert pool.active == 2
        held.through.set()
        await wait_until(lambda: _completed(store, 10), "10 jobs completed")
        await wait_until(lambda: _idle(pool), "every slot free")


async def _active(store: Store, queues: Sequence[str] = (Q,)) -> int:
    r = store.connection.client
    return sum([int(await r.zcard(store.keys.active(queue, ME))) for queue in queues])


async def _claimed(store: Store, count: int, queues: Sequence[str] = (Q,)) -> bool:
    return await _active(store, queues) >= count


async def _idle(pool: WorkerPool) -> bool:
    return pool.active == 0


async def _completed(store: Store, count: int, queue: str = Q) -> bool:
    return int(await store.connection.client.zcard(store.keys.completed(queue))) == count


SPAWNER = REPO / "tests" / "programs" / "spawn_and_sleep.py"


@pytest.mark.parametrize("cut", ["timeout", "cancel", "stop"])
@pytest.mark.timeout(60)
async def test_an_attempt_cut_short_kills_and_reaps_its_program_first(
    store: Store, redis_url: str, tmp_path: Path, cut: str
) -> None:
    pid_file = tmp_path / "pids"
    # Long enough for the program and its grandchild to start on a loaded machine.
    timeout = 3 if cut == "timeout" else 60
    spawn = {"exec": [str(SPAWNER), str(pid_file)], "timeout": timeout}
    [job] = await enqueue(store, 1, job_type="spawn", max_attempts=1)
    async with running_pool(store, redis_url, concurrency=2, spawn=spawn) as pool:
        await wait_until(lambda: _holds(pid_file.exists), "the program to write its pids")
        child, grandchild = read_pids(pid_file)
        if cut == "cancel":
            assert pool.cancel_local(job.id)
        if cut == "stop":
            await pool.drain(0)
        else:
            await wait_until(lambda: _ended(store, job.id), "the job to end")
        # The program was killed and reaped before the attempt ended.
        assert is_gone(child)
    ended = await stored(store, job.id)
    expected = {
        "timeout": ("failed", "timed out after 3 s"),
        "cancel": ("cancelled", "cancelled while running"),
        "stop": ("queued", None),  # back in its queue, its attempt given back
    }
    assert (ended.state, ended.error) == expected[cut]
    await wait_until(lambda: _holds(lambda: is_gone(grandchild)), "the grandchild to die")


async def _holds(condition: Callable[[], bool]) -> bool:
    return condition()


async def _ended(store: Store, job_id: str) -> bool:
    return (await stored(store, job_id)).state in ("failed", "cancelled")


@pytest.mark.timeout(30)
async def test_a_handler_that_swallows_its_cancellation_is_cancelled_again(
    store: Store, redis_url: str
) -> None:
    stubborn = {"python": "tests.handler_funcs:stubborn", "timeout": 0.2}
    [job] = await enqueue(store, 1, job_type="stubborn", max_attempts=1)
    async with running_pool(store, redis_url, concurrency=1, stubborn=stubborn):
        await wait_until(lambda: _ended(store, job.id), "the job to end", deadline=10)
    assert (await stored(store, job.id)).error == "timed out after 0.2 s"


@pytest.mark.timeout(60)
async def test_every_queue_claims_again_once_outcomes_are_recorded(
    store: Store, redis_url: str
) -> None:
    held = HeldAcks(store)
    await enqueue(store, 300)
    await enqueue(store, 300, queue="other")
    async with running_pool(held, redis_url, concurrency=10, queues=(Q, "other")) as pool:
        # Every slot holds a job whose outcome waits: neither queue's fetcher claims now.
        await wait_until(lambda: _claimed(store, 10, queues=(Q, "other")), "10 jobs claimed")
        held.through.set()
        # The recorded outcomes freed the slots for both queues: every job of both ran.
        await wait_until(lambda: _completed(store, 300), "300 jobs completed", deadline=30)
        await wait_until(
            lambda: _completed(store, 300, "other"), "300 jobs of the other queue", deadline=30
        )
        await wait_until(lambda: _idle(pool), "every slot free")


class CountedClaims(Store):
    """A store that counts the jobs claimed on their own and with an ack, the most jobs
    this daemon held in Redis (its active set) after each of its calls, and the most acks
    with a claim on the wire at once."""

    def __init__(self, store: Store) -> None:
        super().__init__(connection=store.connection)
        self.alone = 0
        self.with_acks = 0
        self.most_held = 0
        self.on_wire = 0
        self.most_on_wire = 0

    async def claim(self, queue: str, daemon_id: str, *args: Any, **kwargs: Any) -> Claimed:
        claimed = await super().claim(queue, daemon_id, *args, **kwargs)
        self.alone += len(claimed.jobs)
        await self._held(queue, daemon_id)
        return claimed

    async def ack_and_claim(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], request: ClaimRequest
    ) -> tuple[list[bool], Claimed]:
        self.on_wire += 1
        self.most_on_wire = max(self.most_on_wire, self.on_wire)
        try:
            flags, claimed = await super().ack_and_claim(queue, daemon_id, attempts, request)
        finally:
            self.on_wire -= 1
        self.with_acks += len(claimed.jobs)
        await self._held(queue, daemon_id)
        return flags, claimed

    async def _held(self, queue: str, daemon_id: str) -> None:
        held = int(await self.connection.client.zcard(self.keys.active(queue, daemon_id)))
        self.most_held = max(self.most_held, held)


async def drained(store: Store, redis_url: str, jobs: int, concurrency: int) -> CountedClaims:
    """`jobs` waiting jobs run by a pool of `concurrency` slots, until every slot is free."""
    counted = CountedClaims(store)
    await enqueue(store, jobs)
    async with running_pool(counted, redis_url, concurrency=concurrency) as pool:
        await wait_until(lambda: _completed(store, jobs), f"{jobs} jobs completed", deadline=45)
        await wait_until(lambda: _idle(pool), "every slot free")
    return counted


@pytest.mark.timeout(60)
async def test_a_busy_queue_claims_with_the_acks_that_free_the_slots(
    store: Store, redis_url: str
) -> None:
    counted = await drained(store, redis_url, 600, concurrency=10)
    # Past the first claims, the slots an ack frees are filled in its own round trip: a
    # claim on its own is what a queue running dry (or a claim that came up short) costs.
    assert counted.alone + counted.with_acks == 600
    assert counted.with_acks >= 400, (counted.alone, counted.with_acks)
    # And never more jobs in Redis than slots: the ack runs before the claim sent with it.
    assert counted.most_held <= 10


@pytest.mark.timeout(60)
async def test_a_drain_keeps_two_acks_on_the_wire_and_no_more_jobs_than_slots(
    store: Store, redis_url: str
) -> None:
    # 64 slots: every job ends before the first ack, which is split in two halves, each
    # acknowledged (and its slots claimed again) while the other's jobs run.
    counted = await drained(store, redis_url, 2000, concurrency=64)
    assert counted.most_on_wire == 2
    assert counted.most_held <= 64


async def test_the_room_offered_for_a_capped_type_is_never_below_nothing(
    store: Store, redis_url: str
) -> None:
    # While a claim sent with an ack holds the room of the jobs it acks, more than the cap
    # of a type can be counted as taken; a claim offered a negative room would take it for
    # no cap at all (claim.lua), so it is offered none. A pool not running: no fetcher
    # holds room meanwhile.
    handlers = {"capped": {"builtin": "noop", "concurrency": 2}}
    config = make_config(redis_url, handlers=handlers)
    async with Handlers(config.handlers) as runners:
        pool = WorkerPool(
            store=store,
            handlers=runners,
            handler_configs=config.handlers,
            daemon_id=ME,
            queues=(Q,),
            concurrency=4,
            metrics=Metrics(concurrency=4),
        )
        assert pool._room() == {"capped": 2}
        pool._take_types({"capped": 3}, 1)  # as _plan_claim does, with nothing running
        assert pool._room() == {"capped": 0}
        assert pool._room({"capped": 1}) == {"capped": 0}
        assert pool._room({"capped": 2}) == {"capped": 1}
