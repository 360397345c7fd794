"""The SlotArbiter on its own: how a daemon's slots are shared out between its queues."""

from __future__ import annotations

import anyio
import pytest

from taskd.slots import SlotArbiter

QUEUES = ["high", "low"]


async def test_strict_gives_a_later_queue_slots_only_while_earlier_ones_are_idle() -> None:
    arbiter = SlotArbiter(capacity=3, queues=["high", "mid", "low"], batch=10, mode="strict")
    got: list[tuple[str, int]] = []

    async def fetch(queue: str) -> None:
        got.append((queue, await arbiter.acquire(queue)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch, "low")
        tg.start_soon(fetch, "mid")
        await anyio.wait_all_tasks_blocked()
        assert got == []  # high has not been claimed from yet: it may have work
        assert await arbiter.acquire("high") == 3
        arbiter.settle("high", 0, idle=False)  # a full claim: high may have more
        arbiter.release()  # a high job ended while high claims again
        await anyio.wait_all_tasks_blocked()
        assert got == []
        assert await arbiter.acquire("high") == 1  # the slot was kept for high
        arbiter.settle("high", 1, idle=True)  # high ran dry
        await anyio.wait_all_tasks_blocked()
        assert got == [("mid", 1)]  # mid claims now: low still waits
        arbiter.settle("mid", 1, idle=True)
        await anyio.wait_all_tasks_blocked()
        assert got == [("mid", 1), ("low", 1)]
        arbiter.settle("low", 0, idle=False)
        # A job arrives for high while low has work too: the next free slot is high's.
        tg.start_soon(fetch, "low")
        tg.start_soon(fetch, "high")
        await anyio.wait_all_tasks_blocked()
        assert arbiter.active == 3
        arbiter.release()
        await anyio.wait_all_tasks_blocked()
        assert got[-1] == ("high", 1)
        arbiter.settle("high", 0, idle=False)
        arbiter.release()  # kept for high, which claims: not low's either
        await anyio.wait_all_tasks_blocked()
        assert got[-1] == ("high", 1)
        assert arbiter.active == 3
        arbiter.settle("high", 0, idle=True)  # high's claim came back short
        await anyio.wait_all_tasks_blocked()
        assert got[-1] == ("low", 1)


async def test_strict_takes_back_slots_kept_for_a_later_queue() -> None:
    arbiter = SlotArbiter(capacity=2, queues=QUEUES, batch=10, mode="strict")
    arbiter.settle("high", 0, idle=True)  # high is empty: low may have everything
    assert await arbiter.acquire("low") == 2
    arbiter.settle("low", 0, idle=False)
    arbiter.release()  # kept for low, which claims
    with anyio.fail_after(5):
        assert await arbiter.acquire("high") == 1  # high has work again: the slot is its


async def test_weighted_picks_follow_the_weights_exactly() -> None:
    weights = {"a": 5, "b": 3, "c": 1}
    arbiter = SlotArbiter(capacity=1, queues=list(weights), batch=10, weights=weights)
    send, receive = anyio.create_memory_object_stream[str](10)

    async def fetcher(queue: str) -> None:
        while True:
            granted = await arbiter.acquire(queue)
            assert granted == 1
            send.send_nowait(queue)
            arbiter.settle(queue, 0, idle=False)  # its job runs until the test ends it

    picks: list[str] = []
    with anyio.fail_after(20):
        async with send, receive, anyio.create_task_group() as tg:
            for queue in weights:
                tg.start_soon(fetcher, queue)
            for i in range(900):
                if i:
                    arbiter.release()  # a job ends: one slot free at a time
                picks.append(await receive.receive())
            tg.cancel_scope.cancel()
    # Smooth: the nginx sequence, and every round of 9 picks holds each weight exactly.
    assert "".join(picks[:9]) == "abacababa"
    for start in range(0, 900, 9):
        window = picks[start : start + 9]
        assert [window.count(q) for q in weights] == [5, 3, 1], start
    assert arbiter.active == 1  # the job of the last pick


async def test_weighted_keeps_picks_for_a_claiming_queue() -> None:
    # Jobs end one at a time while both fetchers are claiming: the picks still follow the
    # weights, kept until each fetcher asks again, which then takes them without waiting.
    arbiter = SlotArbiter(capacity=4, queues=QUEUES, batch=10, weights={"high": 3})
    with anyio.fail_after(5):
        for _ in range(3):
            assert await arbiter.acquire("high") == 3  # picks: high, high, low, high
            assert await arbiter.acquire("low") == 1
            assert arbiter.active == 4
            arbiter.settle("high", 0, idle=False)
            arbiter.settle("low", 0, idle=False)
            for _ in range(4):
                arbiter.release()


async def test_unused_slots_come_back_at_once_and_an_idle_queue_takes_no_share() -> None:
    arbiter = SlotArbiter(capacity=5, queues=["a", "b"], batch=10)
    with anyio.fail_after(5):
        assert await arbiter.acquire("a") == 3  # picks a, b, a, b, a
        arbiter.settle("a", 3, idle=True)  # a was empty
        assert arbiter.active == 5  # a's three went to b at once, with the two kept for it
        assert await arbiter.acquire("b") == 5
        arbiter.settle("b", 4, idle=True)  # one job: b is empty too
        assert arbiter.active == 1
        arbiter.release()
        assert arbiter.active == 0


async def test_a_grant_is_at_most_a_batch() -> None:
    arbiter = SlotArbiter(capacity=10, queues=["a"], batch=4)
    with anyio.fail_after(5):
        assert [await arbiter.acquire("a") for _ in range(3)] == [4, 4, 2]
    assert arbiter.active == 10


async def test_a_cancelled_acquire_has_nothing_kept_for_it() -> None:
    arbiter = SlotArbiter(capacity=1, queues=["a"], batch=10)
    assert await arbiter.acquire("a") == 1
    arbiter.settle("a", 0, idle=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.acquire, "a")
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()  # the pool drains while its fetcher waits for a slot
    arbiter.release()  # the running job ends: the slot stays free
    assert arbiter.active == 0


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="strict, weighted"):
        SlotArbiter(capacity=1, queues=["a"], batch=1, mode="fair")


async def test_slots_taken_for_jobs_about_to_be_released_are_never_handed_out_twice() -> None:
    arbiter = SlotArbiter(capacity=2, queues=QUEUES, batch=10)
    # Neither queue has claimed yet, so either may have work: neither is alone.
    assert not arbiter.alone("high")
    arbiter.settle("low", 0, idle=True)  # low's claim found it empty
    assert await arbiter.acquire("high") == 2
    arbiter.settle("high", 0, idle=False)
    assert arbiter.alone("high")
    assert not arbiter.alone("low")
    # Two jobs of high are acked with a claim that got two more: their slots pass on.
    arbiter.take(2)
    assert arbiter.active == 4
    arbiter.release()
    arbiter.release()
    assert arbiter.active == 2
    got: list[int] = []

    async def fetch() -> None:
        got.append(await arbiter.acquire("high"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # every slot is in use: nothing for the fetcher
        arbiter.release()
        await anyio.wait_all_tasks_blocked()
        assert got == [1]
