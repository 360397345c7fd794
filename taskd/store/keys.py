"""Every Redis key name taskd uses, built in one place.

All keys of one queue carry the queue's name as their hash tag (`taskd:{images}:ready`),
so that one queue lives on one Redis Cluster slot and every script touching a queue
stays on one shard. Keys that belong to no queue share the tag `{prefix:global}`; queue
names cannot contain a colon, so no queue shares that slot by accident.

The Lua scripts (lua/*.lua, whose KEYS headers show these patterns) build some keys
themselves from what the store passes them; each builder says so. They derive: the
priority lists (the inbox's name + ':<priority>', lib.lua priority_list), job hashes
(job_prefix + id), landing lists (landing_prefix + daemon id, purge.lua), and a job
type's limit keys (limit_prefix + type + ':running', ':line', ':starts', ':held';
limits.lua, lib.lua release_slot and free_held).

The method names are the things' names; a few key strings are older words for them,
kept so that daemons of older versions go on sharing the data: the inbox is `:ready`,
the failed set `:dead`, the leases `:owners`.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskd.jobs import PRIORITIES


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builders for one prefix."""

    prefix: str

    # Keys of one queue.

    def _of(self, queue: str, name: str) -> str:
        return f"{self.prefix}:{{{queue}}}:{name}"

    def inbox(self, queue: str) -> str:
        """The queue's inbox: the list of ready ids daemons block on (see lua/lib.lua).

        Lists are pushed on the left and taken from the right (FIFO).
        """
        return self._of(queue, "ready")

    def priority_list(self, queue: str, priority: int) -> str:
        """List of ready ids of one priority that wait behind the inbox's (Lua derives
        it from the inbox: lib.lua priority_list)."""
        return f"{self.inbox(queue)}:{priority}"

    def ready_lists(self, queue: str) -> list[str]:
        """Every list a ready id can be in: the inbox, then each priority's list."""
        return [self.inbox(queue), *(self.priority_list(queue, p) for p in PRIORITIES)]

    def job_prefix(self, queue: str) -> str:
        """Prefix of job hashes; Lua scripts append the id to it (JOB, lua/lib.lua)."""
        return self._of(queue, "job:")

    def job(self, queue: str, job_id: str) -> str:
        """Hash holding one job's record."""
        return self.job_prefix(queue) + job_id

    def idempotency_prefix(self, queue: str) -> str:
        """Prefix of the strings mapping an idempotency key to the job that holds it."""
        return self._of(queue, "idem:")

    def landing_prefix(self, queue: str) -> str:
        """Prefix of the landing lists; purge.lua appends a daemon's id to it."""
        return self._of(queue, "landing:")

    def landing(self, queue: str, daemon_id: str) -> str:
        """List a daemon's blocking fetch moves one id into (BLMOVE needs a list)."""
        return self.landing_prefix(queue) + daemon_id

    def active(self, queue: str, daemon_id: str) -> str:
        """Sorted set of the ids a daemon runs, scored by start time (its in-flight set)."""
        return self._of(queue, f"active:{daemon_id}")

    def scheduled(self, queue: str) -> str:
        """Sorted set of ids waiting for their time (delayed jobs, retries), scored by it."""
        return self._of(queue, "scheduled")

    def completed(self, queue: str) -> str:
        """Sorted set of completed ids, scored by finish time."""
        return self._of(queue, "completed")

    def failed(self, queue: str) -> str:
        """Sorted set of failed ids (the dead letters), scored by finish time."""
        return self._of(queue, "dead")

    def cancelled(self, queue: str) -> str:
        """Sorted set of cancelled ids, scored by finish time."""
        return self._of(queue, "cancelled")

    def finished(self, queue: str, state: str) -> str:
        """The sorted set of one final state (completed, failed, cancelled)."""
        return {"completed": self.completed, "failed": self.failed, "cancelled": self.cancelled}[
            state
        ](queue)

    def index(self, queue: str) -> str:
        """The index of record layouts 1 and 2 (record.RECORD_VERSION): a sorted set of
        stored ids, all scored 0: ids are time-ordered UUIDv7s, so lexicographic order is
        creation order and a listing can page by id. Written while a daemon that reads
        only it is registered; read and cleared always."""
        return self._of(queue, "index")

    def pages(self, queue: str) -> str:
        """The paged index's directory (layout 3; index.lua): a sorted set,
        all scored 0, of '<first id>:<page number>', one member per page of ids."""
        return self._of(queue, "pages")

    def page(self, queue: str, number: int) -> str:
        """One page of the paged index: a hash of 16-byte ids to ''. index.lua names it the
        same way, from the directory's key (page_key)."""
        return f"{self.pages(queue)}:{number}"

    def page_counters(self, queue: str) -> list[str]:
        """The paged index's counters, named from the directory's key as index.lua does:
        the last page number handed out, and the greatest id ever indexed."""
        return [f"{self.pages(queue)}:seq", f"{self.pages(queue)}:top"]

    def callbacks(self, queue: str) -> str:
        """The callback outbox: ids of final jobs whose callback is still to be sent."""
        return self._of(queue, "callbacks")

    def sending(self, queue: str, daemon_id: str) -> str:
        """Sorted set of the callbacks a daemon is sending, scored by when it took them."""
        return self._of(queue, f"sending:{daemon_id}")

    def archive(self, queue: str) -> str:
        """The archive hand-off: sorted set of the final jobs still to be written to the
        archive, scored by when each ended (see lua/lib.lua, keep_for_archive)."""
        return self._of(queue, "archive")

    def archive_kept(self, queue: str) -> str:
        """Hash of copies of records that left their final state before they were archived."""
        return self._of(queue, "archive:kept")

    def archive_lock(self, queue: str) -> str:
        """The id of the daemon archiving the queue, for a lease (see archive_lease.lua)."""
        return self._of(queue, "archive:lock")

    def limit_prefix(self, queue: str) -> str:
        """Prefix of the keys that enforce a job type's limits (LIMIT, lua/lib.lua);
        scripts append the type and ':running' (ids holding a global_concurrency slot),
        ':line' (ids held for one, a sorted set best first: priority, then when each
        became due) or ':starts' (recent starts, for rate_limit). ':held' is the plain
        list older daemons held jobs in; claims move what it holds into the line (see
        lua/limits.lua)."""
        return self._of(queue, "limit:")

    def limit(self, queue: str, job_type: str, part: str) -> str:
        """One of a job type's limit keys (see limit_prefix)."""
        return f"{self.limit_prefix(queue)}{job_type}:{part}"

    def limit_waits(self, queue: str) -> str:
        """Hash counting, per job type, how often a job waited for a limit
        (fields TYPE:rate_limit and TYPE:concurrency)."""
        return self._of(queue, "limit_waits")

    def unhandled(self, queue: str) -> str:
        """Hash of the job types a claim found ready but had no handler for: type ->
        'ID DUE', the first such job it passed and when it became due (epoch ms). A claim
        that starts a job of the type removes its field."""
        return self._of(queue, "unhandled")

    def leases(self, queue: str) -> str:
        """Sorted set of daemons that may hold jobs of the queue, scored by their last
        heartbeat: the lease a reaper checks in the same script that takes jobs back."""
        return self._of(queue, "owners")

    def schedules(self, queue: str) -> str:
        """Hash of the recurring schedules whose jobs go to the queue: last tick and job."""
        return self._of(queue, "schedules")

    def paused(self, queue: str) -> str:
        """Present while the queue is paused: no daemon starts its jobs."""
        return self._of(queue, "paused")

    def throughput(self, queue: str) -> str:
        """Hash of finished-job counts per 10-second bucket (field: epoch ms // 10000)."""
        return self._of(queue, "throughput")

    def arrivals(self, queue: str) -> str:
        """Hash of submitted-job counts per 10-second bucket (field: epoch ms // 10000),
        kept as long as the throughput's: the arrival rate of the autoscaling hint."""
        return self._of(queue, "arrivals")

    def waits(self, queue: str) -> str:
        """List of the latest wait times (ms from due to start), newest first, capped."""
        return self._of(queue, "waits")

    def runs(self, queue: str) -> str:
        """List of the latest run times (ms from start to finish), newest first, capped."""
        return self._of(queue, "runs")

    def totals(self, queue: str) -> str:
        """Hash of counters since the data began (enqueued, completed, failed, ...)."""
        return self._of(queue, "totals")

    def queue_state(self, queue: str) -> list[str]:
        """A queue's keys that hold no job: what forgetting an empty queue deletes."""
        return [
            *self.ready_lists(queue),
            self.paused(queue),
            self.totals(queue),
            self.waits(queue),
            self.runs(queue),
            self.throughput(queue),
            self.arrivals(queue),
            self.limit_waits(queue),
            self.unhandled(queue),
            self.schedules(queue),
            self.archive_lock(queue),
            *self.page_counters(queue),
        ]

    # Keys of the whole installation.

    def _global(self, name: str) -> str:
        return f"{self.prefix}:{{{self.prefix}:global}}:{name}"

    @property
    def daemons(self) -> str:
        """Sorted set of daemon ids, scored by their last heartbeat."""
        return self._global("daemons")

    def daemon(self, daemon_id: str) -> str:
        """Hash describing one daemon (host, pid, concurrency, queues, active jobs)."""
        return self._global(f"daemon:{daemon_id}")

    @property
    def record_versions(self) -> str:
        """Hash of daemon id to the job record layout it reads (record.RECORD_VERSION), one
        field per daemon that says: a registered daemon without one reads only the first."""
        return self._global("record_versions")

    @property
    def marker(self) -> str:
        """Written by the first heartbeat on a Redis ("DAEMON EPOCH_MS"), never deleted: a
        heartbeat that finds it gone knows Redis lost its data."""
        return self._global("marker")

    @property
    def health_probe(self) -> str:
        """A key /health writes, with a second to live, to see that Redis takes writes."""
        return self._global("health")

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which cancel requests of running jobs reach every daemon."""
        return self._global("cancel")

    @property
    def queues(self) -> str:
        """Set of every queue name any daemon has served or enqueued to."""
        return self._global("queues")
