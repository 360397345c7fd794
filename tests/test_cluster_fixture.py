"""The Redis Cluster fixture, and what redis-py's asyncio cluster client does on it.

These pin the client behaviour taskd's cluster support relies on: one-slot scripts,
transactions and blocking moves; pipelines across slots; pub/sub; per-node INFO.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from redis import Redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import CrossSlotTransactionError, MovedError, RedisClusterException

from tests.cluster import SLOTS, RedisCluster, slot_ranges


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[AsyncRedisCluster]:
    client = AsyncRedisCluster.from_url(cluster_url)
    # from_url does not connect: until the first command, or this, the client knows
    # no nodes (get_node_from_key raises, get_default_node is None).
    await client.initialize()
    yield client
    await client.aclose()


async def _tags_per_node(cluster: AsyncRedisCluster) -> dict[str, str]:
    """One hash tag per node, keyed by node name ("127.0.0.1:port")."""
    tags: dict[str, str] = {}
    for i in range(1000):
        tag = f"{{q{i}}}"
        tags.setdefault(cluster.get_node_from_key(tag).name, tag)
        if len(tags) == 3:
            return tags
    raise AssertionError(f"1000 hash tags reached only {sorted(tags)}")


def test_three_masters_share_all_slots(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.ports[0]}"
    assert len(set(redis_cluster.ports)) == 3
    for url, slots in zip(redis_cluster.node_urls, slot_ranges(), strict=True):
        with Redis.from_url(url, decode_responses=True) as node:
            info = node.cluster("INFO")
            assert info["cluster_state"] == "ok"
            assert info["cluster_known_nodes"] == "3"
            assert info["cluster_slots_assigned"] == str(SLOTS)
            assert info["cluster_size"] == "3"
            mine = next(n for n in node.cluster("NODES").values() if "myself" in n["flags"])
            assert mine["flags"] == "myself,master"
            assert mine["slots"] == [[str(slots.start), str(slots.stop - 1)]]


@pytest.mark.parametrize("run", [1, 2])
async def test_every_test_starts_on_an_empty_cluster(cluster: AsyncRedisCluster, run: int) -> None:
    everywhere = AsyncRedisCluster.PRIMARIES
    assert await cluster.dbsize(target_nodes=everywhere) == 0
    assert [key async for key in cluster.scan_iter()] == []
    # Keys on every node, which the next run's flush must remove.
    for tag in (await _tags_per_node(cluster)).values():
        await cluster.set(f"{tag}left-over", run)
    assert await cluster.dbsize(target_nodes=everywhere) == 3


async def test_node_wide_commands_ask_the_default_node_only(cluster: AsyncRedisCluster) -> None:
    for tag in (await _tags_per_node(cluster)).values():
        await cluster.set(f"{tag}k", 1)
    # DBSIZE and KEYS go to one node unless told otherwise; SCAN visits every primary.
    assert await cluster.dbsize() == 1
    assert len(await cluster.keys("*")) == 1
    assert await cluster.dbsize(target_nodes=AsyncRedisCluster.PRIMARIES) == 3
    assert len(await cluster.keys("*", target_nodes=AsyncRedisCluster.PRIMARIES)) == 3
    assert len([key async for key in cluster.scan_iter()]) == 3
    # FLUSHALL goes to every primary, with one answer each.
    assert list((await cluster.flushall()).values()) == [True, True, True]
    assert [key async for key in cluster.scan_iter()] == []


async def test_hash_tags_put_keys_on_different_nodes(
    cluster: AsyncRedisCluster, redis_cluster: RedisCluster
) -> None:
    tags = await _tags_per_node(cluster)
    assert len(cluster.get_primaries()) == 3
    for name, tag in tags.items():
        key = f"{tag}job"
        await cluster.set(key, name)
        slot = await cluster.cluster_keyslot(key)  # the server's CLUSTER KEYSLOT
        assert slot == cluster.keyslot(key) == await cluster.cluster_keyslot(tag.strip("{}"))
        # Only the node that owns the slot has the key; the others redirect.
        for url in redis_cluster.node_urls:
            with Redis.from_url(url) as node:
                if url.endswith(name):
                    assert node.get(key) == name.encode()
                    assert node.cluster("COUNTKEYSINSLOT", slot) == 1
                else:
                    with pytest.raises(MovedError, match=f"^{slot} {name}$"):
                        node.get(key)


async def test_script_with_two_keys_of_one_tag(cluster: AsyncRedisCluster) -> None:
    move = cluster.register_script(
        "local v = redis.call('GET', KEYS[1]) "
        "redis.call('SET', KEYS[2], v) redis.call('DEL', KEYS[1]) return v"
    )
    await cluster.set("{job:1}a", "payload")
    assert await move(keys=["{job:1}a", "{job:1}b"]) == b"payload"
    assert await cluster.mget("{job:1}a", "{job:1}b") == [None, b"payload"]
    # The client refuses a script whose keys span slots before sending it.
    with pytest.raises(RedisClusterException, match="same key slot"):
        await move(keys=["{job:1}a", "{job:2}b"])


async def test_pipeline_without_transaction_spans_slots(cluster: AsyncRedisCluster) -> None:
    tags = list((await _tags_per_node(cluster)).values())
    async with cluster.pipeline() as pipe:
        for tag in tags:
            pipe.set(f"{tag}k", tag)
            pipe.incr(f"{tag}n")
            pipe.get(f"{tag}k")
        results = await pipe.execute()
    assert results == [r for tag in tags for r in (True, 1, tag.encode())]
    # Two keys on each of the three nodes.
    assert await cluster.dbsize(target_nodes=AsyncRedisCluster.PRIMARIES) == 6


async def test_transaction_pipeline_on_one_slot(cluster: AsyncRedisCluster) -> None:
    async with cluster.pipeline(transaction=True) as pipe:
        pipe.set("{job:1}state", "queued")
        pipe.incr("{job:1}attempts")
        pipe.get("{job:1}state")
        assert await pipe.execute() == [True, 1, b"queued"]
    async with cluster.pipeline(transaction=True) as pipe:
        pipe.set("{job:1}state", "running")
        pipe.set("{job:2}state", "running")
        with pytest.raises(CrossSlotTransactionError):
            await pipe.execute()
    assert await cluster.get("{job:1}state") == b"queued"


async def test_blmove_between_keys_of_one_slot(cluster: AsyncRedisCluster) -> None:
    ready, taken = "{queue:a}ready", "{queue:a}taken"
    # Nothing there: it blocks for its timeout, then answers None.
    assert await cluster.blmove(ready, taken, 0.1, "RIGHT", "LEFT") is None
    # It wakes when another connection pushes.
    waiting = asyncio.create_task(cluster.blmove(ready, taken, 5, "RIGHT", "LEFT"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await cluster.lpush(ready, "job-1")
    assert await asyncio.wait_for(waiting, 5) == b"job-1"
    assert await cluster.lrange(taken, 0, -1) == [b"job-1"]
    with pytest.raises(RedisClusterException, match="same key slot"):
        await cluster.blmove(ready, "{queue:b}taken", 0.1, "RIGHT", "LEFT")


async def test_pubsub_receives_from_every_node(
    cluster: AsyncRedisCluster, redis_cluster: RedisCluster
) -> None:
    # Channels whose slots live on each of the three nodes: in Redis Cluster a
    # PUBLISH reaches subscribers on every node, so one connection hears them all.
    channels = [f"cancel:{tag}" for tag in (await _tags_per_node(cluster)).values()]
    pubsub = cluster.pubsub()
    try:
        await pubsub.subscribe(*channels)
        for channel in channels:
            message = await pubsub.get_message(timeout=5)
            assert message is not None
            assert (message["type"], message["channel"]) == ("subscribe", channel.encode())
        node = pubsub.get_pubsub_node()
        assert node is not None
        assert node.name == cluster.get_node_from_key(channels[0]).name

        # PUBLISH counts the subscribers on the node that took it, not the cluster's;
        # the client sends it to a random primary.
        for channel in channels:
            assert await cluster.publish(channel, f"via-client {channel}") in (0, 1)
        for url, channel in zip(redis_cluster.node_urls, channels, strict=True):
            with Redis.from_url(url) as direct:  # and straight to each node
                here = int(url.endswith(node.name))
                assert direct.publish(channel, f"via-node {channel}") == here

        got = []
        for _ in range(2 * len(channels)):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None
            got.append((message["channel"].decode(), message["data"].decode()))
        assert sorted(got) == sorted(
            (c, f"{how} {c}") for c in channels for how in ("via-client", "via-node")
        )
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1) is None
    finally:
        await pubsub.aclose()


async def test_info_answers_for_one_node_unless_asked_for_more(
    cluster: AsyncRedisCluster, redis_cluster: RedisCluster
) -> None:
    default = cluster.get_default_node()
    info = await cluster.info()
    assert info["redis_mode"] == "cluster"
    assert info["tcp_port"] == default.port
    assert {"redis_version", "used_memory"} <= info.keys()  # a flat dict, as from one Redis
    per_node = await cluster.info("server", target_nodes=AsyncRedisCluster.PRIMARIES)
    assert sorted(per_node) == sorted(
        url.removeprefix("redis://") for url in redis_cluster.node_urls
    )
    assert {entry["process_id"] for entry in per_node.values()} == set(redis_cluster.pids)
    # A single target node gives that node's flat dict, not a one-entry mapping.
    alone = await cluster.info("server", target_nodes=default)
    assert alone["tcp_port"] == default.port


def test_start_and_stop_a_private_cluster(tmp_path_factory: pytest.TempPathFactory) -> None:
    with RedisCluster(data_dir=tmp_path_factory.mktemp("own-cluster")) as own:
        pids = [pid for pid in own.pids if pid is not None]
        assert len(pids) == 3
        with Redis.from_url(own.url) as node:
            assert node.cluster("INFO")["cluster_state"] == "ok"
    assert own.pids == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stop() reaped them: gone, not zombies
