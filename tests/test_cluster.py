"""taskd on a real Redis Cluster: queues on three nodes, daemons in and out of process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from taskd.config import Config
from taskd.store import Attempt, Inspector, Keys, Store, TypeLimits
from taskd.store.record import RECORD_VERSION
from tests.builders import new_job
from tests.support import (
    ECHO,
    REPO,
    DaemonProcess,
    get_json,
    make_config,
    post_json,
    submit_in_turn,
    two_daemons,
    wait_for_state,
    wait_healthy,
    wait_until,
)

K = Keys("taskd")


@pytest.fixture
async def queues(cluster_url: str) -> list[str]:
    """Three queue names whose keys live on three different nodes."""
    client = RedisCluster.from_url(cluster_url)
    try:
        await client.initialize()
        by_node: dict[str, str] = {}
        for n in range(1000):
            node = client.get_node_from_key(K.inbox(f"q{n}")).name
            by_node.setdefault(node, f"q{n}")
    finally:
        await client.aclose()
    assert len(by_node) == 3
    return sorted(by_node.values())


@pytest.fixture
async def cluster_store(cluster_url: str) -> AsyncIterator[Store]:
    store = Store.from_url(cluster_url, prefix="taskd", blocking_connections=2, cluster=True)
    yield store
    await store.close()


async def test_every_script_runs_on_the_node_of_its_queue(
    cluster_store: Store, queues: list[str]
) -> None:
    store = cluster_store
    store.record_version = RECORD_VERSION  # the paged index
    inspector = Inspector(connection=store.connection)
    completed: list[str] = []
    for queue in queues:
        jobs = [
            new_job(
                payload=n,
                queue=queue,
                max_attempts=2,
                priority=n % 10,
                callback_url="http://127.0.0.1:9/",
            )
            for n in range(12)
        ]
        assert await store.enqueue_many(jobs) == [j.id for j in jobs]
        claim = await store.claim(
            queue, "a", 4, now=10, type_limits=[TypeLimits("echo", concurrency=3)]
        )
        assert [j.payload for j in claim.jobs] == [9, 8, 7]  # highest first, 3 at once
        ends = [Attempt(j.id, j.attempts, "completed", "1") for j in claim.jobs[:2]]
        assert await store.ack(queue, "a", ends, now=11) == [True, True]
        completed += [j.id for j in claim.jobs[:2]]
        assert len(await store.take_callbacks(queue, "a", 10, now=12)) == 2
        # Daemon "a" dies: its job and its callbacks in flight come back.
        assert await store.recover(queue, "a", now=100, before=50) == 1
        assert len(await store.take_callbacks(queue, "b", 10, now=101)) == 2
        assert await store.wait_for_job(queue, "b", 1)
        # A purge takes the 10 jobs left, the one landed for "b" too; nothing failed.
        assert sum([n async for n in store.purge(queue, "queued", now=200)]) == 10
        assert sum([n async for n in store.retry_dead(queue, now=200)]) == 0
    counts = await inspector.queue_counts(queues)
    assert all(counts[q]["completed"] == 2 for q in queues)
    # The index of each queue, read on its node (read_pages.lua), merged newest first.
    page = await inspector.list_jobs(queues, state=None, job_type=None, limit=10, cursor=None)
    assert [j.id for j in page.jobs] == sorted(completed, reverse=True)
    for queue in queues:
        assert await store.trim(queue, "completed", cutoff=11) == 2
    assert (
        await inspector.list_jobs(queues, state=None, job_type=None, limit=10, cursor=None)
    ).jobs == []
    info = await inspector.server_info()
    assert info["nodes"] == 3
    assert info["version"] >= "6.2"


async def test_the_archive_hand_off_is_taken_on_the_node_of_its_queue(
    cluster_url: str, queues: list[str]
) -> None:
    store = Store.from_url(
        cluster_url, prefix="taskd", blocking_connections=2, cluster=True, archive=True
    )
    try:
        for queue in queues:
            jobs = [new_job(payload=n, queue=queue) for n in range(3)]
            await store.enqueue_many(jobs)
            claimed = (await store.claim(queue, "a", 3, now=10, type_limits=ECHO)).jobs
            ends = [Attempt(j.id, j.attempts, "completed", str(j.payload)) for j in claimed]
            assert await store.ack(queue, "a", ends, now=11) == [True] * 3
            # One deleted before it is archived: its entry names a kept copy.
            assert await store.delete(queue, jobs[0].id) == "completed"
            taken = await store.take_archive(queue, "a", 10, lease_ms=1000)
            assert taken is not None
            found = {each.entry.split("@")[0]: each.record for each in taken}
            assert sorted(found) == sorted(j.id for j in jobs)
            assert all(r is not None and r.values[1] == b"completed" for r in found.values())
            assert await store.archive_done(queue, "a", taken, release=True) == 3
            assert await store.take_archive(queue, "a", 10, lease_ms=1000) == []
    finally:
        await store.close()


async def test_cancel_requests_reach_subscribers_through_the_cluster(
    cluster_store: Store, queues: list[str]
) -> None:
    running = [new_job(payload=0, queue=queue, max_attempts=2) for queue in queues]
    async with cluster_store.cancel_requests() as requests:
        for j in running:
            await cluster_store.enqueue(j)
            [claimed] = (await cluster_store.claim(j.queue, "a", 1, now=1, type_limits=ECHO)).jobs
            assert claimed.id == j.id
            assert await cluster_store.cancel(j.queue, j.id, now=2) == "active"
        heard = []
        async for job_id in requests:
            heard.append(job_id)
            if len(heard) == 3:
                break
    assert heard == [j.id for j in running]


def cluster_config(cluster_url: str, queues: list[str], **workers: Any) -> Config:
    handlers = {f"echo-{q}": {"builtin": "echo", "queue": q} for q in queues}
    handlers |= {f"sleep-{q}": {"builtin": "sleep", "queue": q} for q in queues}
    settings = {"queues": queues, "heartbeat_interval": 0.2, "dead_after": 1.5, **workers}
    return make_config(cluster_url, redis={"cluster": True}, handlers=handlers, workers=settings)


async def test_two_daemons_serve_queues_on_three_nodes(cluster_url: str, queues: list[str]) -> None:
    config = cluster_config(cluster_url, queues)
    async with two_daemons(config) as (session, (one, two), urls):
        ids = []
        for queue in queues:
            ids += await submit_in_turn(session, urls, {"type": f"echo-{queue}", "payload": 1}, 10)
        done = [await wait_for_state(session, urls[0], i, {"completed"}) for i in ids]
        assert {j["daemon"] for j in done} == {one.identity.id, two.identity.id}
        # A running job is cancelled through the other daemon, by pub/sub across nodes.
        body = {"type": f"sleep-{queues[2]}", "payload": {"seconds": 60}}
        status, sleeper = await post_json(session, f"{urls[0]}/jobs", body)
        assert status == 201
        await wait_for_state(session, urls[1], sleeper["id"], {"active"})
        await post_json(session, f"{urls[1]}/jobs/{sleeper['id']}/cancel", {})
        await wait_for_state(session, urls[0], sleeper["id"], {"cancelled"})
        _, stats = await get_json(session, f"{urls[1]}/stats")
    assert stats["redis"]["nodes"] == 3
    assert sum(stats["queues"][q]["completed"] for q in queues) == 30


async def test_jobs_of_a_killed_daemon_come_back_on_a_cluster(
    cluster_url: str, queues: list[str], tmp_path: Path, free_port: Any
) -> None:
    port = free_port()
    path = tmp_path / "taskd.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[redis]\nurl = "{cluster_url}"\ncluster = true\n'
        f"[workers]\nqueues = {queues!r}\nheartbeat_interval = 0.2\ndead_after = 1.5\n"
        + "".join(f'[handlers.sleep-{q}]\nbuiltin = "sleep"\nqueue = "{q}"\n' for q in queues)
    )
    doomed = DaemonProcess(["--config", str(path)], cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, doomed)
        async with aiohttp.ClientSession() as session:
            ids = []
            for queue in queues:
                body = {"type": f"sleep-{queue}", "payload": {"seconds": 0.5}}
                ids += await submit_in_turn(session, [url], body, 4)

            async def doomed_busy() -> bool:
                _, stats = await get_json(session, f"{url}/stats")
                return all(stats["queues"][q]["active"] > 0 for q in queues)

            await wait_until(doomed_busy, "the doomed daemon to run jobs of every queue")
    finally:
        doomed.kill()
    async with two_daemons(cluster_config(cluster_url, queues)) as (session, _, urls):
        done = [await wait_for_state(session, urls[0], i, {"completed"}) for i in ids]
        _, stats = await get_json(session, f"{urls[0]}/stats")
    assert len(done) == 12
    assert all(stats["queues"][q]["totals"]["recovered"] > 0 for q in queues)
