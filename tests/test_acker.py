"""The acker: outcomes that finish together recorded by one script call; two calls on the
wire at once when each carries half the daemon's jobs."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
import redis.exceptions

import taskd.acker
from taskd.acker import LANE_MIN, RETRY_DELAY, Acker
from taskd.jobs import Job
from taskd.store import Attempt, Claimed, ClaimRequest, Store
from tests.builders import Clock, Q, done, enqueue, reaper, stored
from tests.support import ECHO, wait_until


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


class Gated(Store):
    """A store whose acks (with or without a claim) wait at a gate the test opens, one
    gate a call in the order they come; `fail` names the calls that fail once through."""

    def __init__(self, store: Store, fail: Sequence[int] = ()) -> None:
        super().__init__(connection=store.connection)
        self.gates: list[anyio.Event] = []
        self.sizes: list[int] = []  # attempts each call carried, in the order sent
        self.fail = set(fail)

    async def _gate(self, attempts: Sequence[Attempt]) -> None:
        n = len(self.gates)
        self.gates.append(gate := anyio.Event())
        self.sizes.append(len(attempts))
        await gate.wait()
        if n in self.fail:
            raise redis.exceptions.ConnectionError("dropped")

    async def ack(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> list[bool]:
        await self._gate(attempts)
        return await super().ack(queue, daemon_id, attempts, now)

    async def ack_and_claim(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], request: ClaimRequest
    ) -> tuple[list[bool], Claimed | Exception]:
        await self._gate(attempts)
        return await super().ack_and_claim(queue, daemon_id, attempts, request)


async def sent(gated: Gated, calls: int) -> None:
    async def holds() -> bool:
        return len(gated.gates) >= calls

    await wait_until(holds, f"{calls} calls sent")


async def all_recorded(recorded: Recorded, count: int) -> None:
    async def holds() -> bool:
        return len(recorded.flags) >= count

    await wait_until(holds, f"{count} outcomes recorded")


@pytest.mark.timeout(30)
async def test_a_second_ack_goes_out_only_with_half_the_jobs_held(store: Store) -> None:
    clock = Clock()
    holding = 2 * (LANE_MIN + 4)  # so that half of it is above LANE_MIN
    jobs = await claim(store, clock, holding)
    gated = Gated(store)
    recorded = Recorded()
    acker = Acker(
        store=gated, daemon_id="me", clock=clock, on_recorded=recorded, holding=lambda: holding
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(acker.run)
        acker.record(Q, done(jobs[0]))  # alone, while nothing is on the wire: it goes
        await sent(gated, 1)
        # Jobs that end one by one wait for the ack on the wire...
        for job in jobs[1 : holding // 2]:
            acker.record(Q, done(job))
        await anyio.sleep(0.2)  # time for a second call that should not happen
        assert gated.sizes == [1]
        # ...until they are half the jobs held: then a second call carries them.
        acker.record(Q, done(jobs[holding // 2]))
        await sent(gated, 2)
        assert gated.sizes == [1, holding // 2]
        # Two on the wire: what ends meanwhile waits, however many.
        for job in jobs[holding // 2 + 1 :]:
            acker.record(Q, done(job))
        await anyio.sleep(0.2)
        assert len(gated.gates) == 2
        # One answers: the other still on the wire, they are fewer than half. Once
        # nothing is on the wire, they go.
        gated.gates[1].set()
        await anyio.sleep(0.2)
        assert len(gated.gates) == 2
        gated.gates[0].set()
        await sent(gated, 3)
        assert gated.sizes == [1, holding // 2, holding - holding // 2 - 1]
        gated.gates[2].set()
        await all_recorded(recorded, holding)
        tg.cancel_scope.cancel()
    assert set(recorded.flags.values()) == {True}


@pytest.mark.timeout(30)
async def test_every_job_held_waiting_for_its_ack_is_split_between_two_calls(
    store: Store,
) -> None:
    clock = Clock()
    holding = 2 * LANE_MIN + 1
    jobs = await claim(store, clock, holding)
    gated = Gated(store)
    acker = Acker(store=gated, daemon_id="me", clock=clock, holding=lambda: holding)
    for job in jobs:
        acker.record(Q, done(job))
    async with anyio.create_task_group() as tg:
        tg.start_soon(acker.run)
        await sent(gated, 2)
        assert gated.sizes == [LANE_MIN + 1, LANE_MIN]
        for gate in gated.gates:
            gate.set()
        tg.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_no_claim_goes_with_an_ack_until_one_sent_after_a_failure_answers(
    store: Store,
) -> None:
    # Two calls on the wire; the first fails after the second was sent. The second
    # answering does not make claims safe again: the first one's outcomes, sent again,
    # may already have freed their slots (and had their claim run) in Redis.
    clock = Clock()
    holding = 2 * LANE_MIN
    jobs = await claim(store, clock, holding)
    await enqueue(store, holding + 1)  # ready for the claims sent with the acks
    planned: list[int] = []

    def plan(queue: str, attempts: list[Attempt]) -> ClaimRequest:
        planned.append(len(attempts))
        return ClaimRequest(len(attempts), clock.now, ECHO, {})

    gated = Gated(store, fail=[0])
    recorded = Recorded()
    acker = Acker(
        store=gated,
        daemon_id="me",
        clock=clock,
        plan_claim=plan,
        on_recorded=recorded,
        holding=lambda: holding,
    )
    for job in jobs:
        acker.record(Q, done(job))
    async with anyio.create_task_group() as tg:
        tg.start_soon(acker.run)
        await sent(gated, 2)
        assert planned == [LANE_MIN, LANE_MIN]
        gated.gates[0].set()  # fails: its outcomes wait to be sent again
        await anyio.sleep(0.1)
        gated.gates[1].set()  # begun before the failure: answers, claims nothing new
        await sent(gated, 3)  # the failed call's outcomes, sent again...
        assert planned == [LANE_MIN, LANE_MIN]  # ...without a claim
        gated.gates[2].set()
        await all_recorded(recorded, holding)
        # An ack begun after the failure has answered: claims go with acks again.
        acker.record(Q, Attempt(jobs[0].id, 9, "completed", "null"))
        await sent(gated, 4)
        assert planned == [LANE_MIN, LANE_MIN, 1]
        gated.gates[3].set()
        tg.cancel_scope.cancel()


class Failing(Store):
    """A store whose acks all fail, as a Redis that is down; it notes when each came."""

    def __init__(self, store: Store) -> None:
        super().__init__(connection=store.connection)
        self.calls: list[float] = []

    async def ack(
        self, queue: str, daemon_id: str, attempts: Sequence[Attempt], now: int
    ) -> list[bool]:
        self.calls.append(anyio.current_time())
        raise redis.exceptions.ConnectionError("down")


@pytest.mark.timeout(30)
async def test_a_failed_ack_is_sent_again_once_a_retry_delay_later(store: Store) -> None:
    # Two lanes: the one whose send failed waits RETRY_DELAY, and so does the other.
    clock = Clock()
    [job] = await claim(store, clock, 1)
    failing = Failing(store)
    acker = Acker(store=failing, daemon_id="me", clock=clock)
    acker.record(Q, done(job))
    async with anyio.create_task_group() as tg:
        tg.start_soon(acker.run)
        await anyio.sleep(2.5 * RETRY_DELAY)
        tg.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(failing.calls, failing.calls[1:], strict=False)]
    assert len(failing.calls) == 3, failing.calls
    assert min(gaps) >= 0.9 * RETRY_DELAY, gaps


async def test_an_outcome_sent_again_carries_no_claim_even_after_another_ack_answered(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed batch sent again in parts: the first part's answer does not make a claim
    # safe for the rest, whose failed call may have run (and claimed) in Redis.
    clock = Clock()
    jobs = await claim(store, clock, 2)
    await enqueue(store, 2)
    planned: list[int] = []

    def plan(queue: str, attempts: list[Attempt]) -> ClaimRequest:
        planned.append(len(attempts))
        return ClaimRequest(len(attempts), clock.now, ECHO, {})

    acker = Acker(store=FailsOnce(store), daemon_id="me", clock=clock, plan_claim=plan)
    acker.record(Q, done(jobs[0]))
    acker.record(Q, done(jobs[1]))
    with pytest.raises(redis.exceptions.ConnectionError):
        await acker.tick()  # both, with a claim: the call fails
    assert planned == [2]
    monkeypatch.setattr(taskd.acker, "ACK_BATCH", 1)
    assert await acker.tick() == 1  # the first again, without a claim; it answers
    assert await acker.tick() == 1  # the second again: still without one
    assert planned == [2]
    # An outcome not sent before goes with a claim again.
    [third] = (await store.claim(Q, "me", 1, now=clock.now, type_limits=ECHO)).jobs
    acker.record(Q, done(third))
    assert await acker.tick() == 1
    assert planned == [2, 1]
