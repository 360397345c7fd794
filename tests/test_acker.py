"""The acker: outcomes that finish together recorded by one script call, one tick at a time."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import redis.exceptions

from taskd.acker import Acker
from taskd.jobs import Job
from taskd.store import Attempt, Claimed, ClaimRequest, Store
from tests.builders import Clock, Q, done, enqueue, reaper, stored
from tests.support import ECHO


class Recorded:
    """What the acker reported back, by job id."""

    def __init__(self) -> None:
        self.flags: dict[str, bool] = {}

    def __call__(self, attempt: Attempt, recorded: bool) -> None:
        assert attempt.job_id not in self.flags, "reported twice"
        self.flags[attempt.job_id] = recorded


async def record_all(acker: Acker, recorded: Recorded, attempts: list[Attempt]) -> list[bool]:
    """Record every attempt at once, as workers finishing together do; one tick sends them."""
    for attempt in attempts:
        acker.record(Q, attempt)
    assert recorded.flags == {}  # nothing is recorded before a tick sends it
    assert await acker.tick() == len(attempts)
    return [recorded.flags[attempt.job_id] for attempt in attempts]


async def claim(store: Store, clock: Clock, count: int) -> list[Job]:
    await enqueue(store, count)
    return (await store.claim(Q, "me", count, clock.now, type_limits=ECHO)).jobs


async def test_outcomes_pending_together_are_recorded_by_one_tick(store: Store) -> None:
    clock = Clock()
    jobs = await claim(store, clock, 3)
    retries: list[tuple[str, int]] = []
    recorded = Recorded()
    acker = Acker(
        store=store,
        daemon_id="me",
        clock=clock,
        on_retry=lambda q, due: retries.append((q, due)),
        on_recorded=recorded,
    )
    retry = Attempt(jobs[2].id, 1, "retry", "flaky", clock.now + 500)
    assert (
        await record_all(acker, recorded, [done(jobs[0]), done(jobs[1], "failed"), retry])
        == [True] * 3
    )
    states = [(await stored(store, job.id)).state for job in jobs]
    assert states == ["completed", "failed", "scheduled"]
    assert retries == [(Q, clock.now + 500)]  # so that the promoter wakes for it
    assert await acker.tick() == 0


async def test_the_outcome_of_a_job_taken_back_meanwhile_is_dropped(store: Store) -> None:
    clock = Clock()
    [job] = await claim(store, clock, 1)
    clock.now += 60_000  # this daemon was silent: another daemon's reaper takes the job back
    assert await reaper(store, clock, me="other").tick() == 1
    recorded = Recorded()
    acker = Acker(store=store, daemon_id="me", clock=clock, on_recorded=recorded)
    assert await record_all(acker, recorded, [done(job)]) == [False]
    back = await stored(store, job.id)
    assert (back.state, back.attempts) == ("queued", 1)


class FailsOnce(Store):
    """A store whose first ack sent with a claim fails, as a dropped connection does."""

    def __init__(self, store: Store) -> None:
        super().__init__(connection=store.connection)
        self.failed = False

    async def ack_and_claim(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], request: ClaimRequest
    ) -> tuple[list[bool], Claimed | Exception]:
        if not self.failed:
            self.failed = True
            raise redis.exceptions.ConnectionError("dropped")
        return await super().ack_and_claim(queue, daemon_id, attempts, request)


async def test_an_ack_sent_again_after_a_failure_carries_no_claim(store: Store) -> None:
    clock = Clock()
    jobs = await claim(store, clock, 2)
    await enqueue(store, 2)  # ready for the claims sent with the acks
    planned: list[int] = []
    claimed: list[Claimed | None] = []

    def plan(queue: str, attempts: list[Attempt]) -> ClaimRequest:
        planned.append(len(attempts))
        return ClaimRequest(len(attempts), clock.now, ECHO, {})

    acker = Acker(
        store=FailsOnce(store),
        daemon_id="me",
        clock=clock,
        plan_claim=plan,
        on_claimed=lambda queue, request, got: claimed.append(got),
    )
    acker.record(Q, done(jobs[0]))
    with pytest.raises(redis.exceptions.ConnectionError):
        await acker.tick()
    assert (planned, claimed) == ([1], [None])  # the claim's room is given back
    # Sent again alone: had the failed call run in Redis, a second claim would take
    # more jobs than the ack frees.
    assert await acker.tick() == 1
    assert planned == [1]
    # Once an ack went through, claims go with acks again.
    acker.record(Q, done(jobs[1]))
    assert await acker.tick() == 1
    assert planned == [1, 1]
    got = claimed[-1]
    assert got is not None
    assert len(got.jobs) == 1
