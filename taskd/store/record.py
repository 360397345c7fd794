"""Every layout that crosses between Python and Lua: hashes and positional script entries.

The job and daemon hashes, and the positional entries the scripts take and give for new
jobs, claimed jobs, attempts and type limits. Each layout is declared once here, as a
tuple of names, with the script that reads it; the scripts' headers point back here.
Change one side, change the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from taskd.jobs import ACTIVE, DEFAULT_PRIORITY, FINAL_STATES, Job

# The fields of a job's hash ({prefix}:{<queue>}:job:<id>), as every script reads and
# writes them. cancel_requested is present (with the time asked) or absent; progress,
# progress_message and progress_at go together. attempts and priority are absent while
# at 0 and DEFAULT_PRIORITY (a field is about 72 bytes in a hash too big to be compact),
# earlier_attempts (the attempts before the latest retry by hand, retry.lua) while at 0.
# id and queue repeat the key, and readers take them from the key they read (decode_job):
# they are written only for daemons of an older taskd (see RECORD_VERSION).
# trace is present only for jobs submitted with tracing on (Job.trace).
JOB_FIELDS = (
    "id", "type", "queue", "payload", "state", "attempts", "max_attempts", "created_at",
    "started_at", "finished_at", "run_at", "result", "error", "daemon", "cancel_requested",
    "history", "idempotency_key", "progress", "progress_message", "progress_at",
    "callback_url", "priority", "waiting_for", "earlier_attempts", "trace",
)  # fmt: skip

# The job record layouts this taskd reads and writes: 1 with id and queue in each record,
# 2 without; both index ids in a sorted set (keys.index). 3 indexes them in pages
# (keys.pages, index.lua), which daemons of 1 and 2 do not read.
# Each daemon registers the newest it reads (keys.record_versions; a daemon that does not
# say reads only 1), and a store writes the oldest layout that a heartbeat found some
# registered daemon reads (Store.beat): in a rolling upgrade, records keep the two fields,
# and new jobs go to the sorted set, until the last daemon that needs them has left the
# registry. Readers and removers handle every layout, whatever they write.
RECORD_VERSION = 3
OLDEST_RECORD_VERSION = 1

# A new job as enqueue.lua takes it: these entries per job, after the script's own
# arguments. run_at 0: run now; idempotency_key, callback_url and trace '': none. Each job
# brings its created_at: one call carries jobs submitted at different moments (the
# store gathers them, see Store.enqueue), and each is stored as its submitter was told.
# id_bytes: the id's 16 bytes, its entry in the paged index (made here, as Lua would
# spend some 2.5 µs a job on it).
NEW_JOB = (
    "id", "type", "payload", "max_attempts", "run_at", "idempotency_key", "callback_url",
    "priority", "created_at", "trace", "id_bytes",
)  # fmt: skip

# A job as claim.lua answers it: these entries per claimed job. waited_ms is not a field
# of the hash: how long the attempt waited since the job was due. callback_url and trace
# '': none (trace: the context the attempt's span continues, taskd.tracing).
CLAIMED_JOB = (
    "id", "type", "payload", "attempts", "created_at", "max_attempts", "started_at",
    "waited_ms", "callback_url", "earlier_attempts", "trace",
)  # fmt: skip

# A finished attempt as ack.lua takes it: these entries per attempt. The script writes
# the attempt's history entry from them and the job's hash.
ATTEMPT = ("job_id", "attempt", "outcome", "value", "retry_at", "finished_at")

# A final job as the archiver reads it (Store.take_archive): these fields of its hash
# (decode_archive_record fills in defaults and the implied history entry).
ARCHIVED = (
    "type", "state", "attempts", "payload", "result", "error", "priority", "idempotency_key",
    "max_attempts", "created_at", "started_at", "finished_at", "daemon", "callback_url",
    "history",
)  # fmt: skip

# A job type's limits as claim.lua (and limits.lua) takes them: these entries per type.
# free: its handler's free slots in this daemon, -1 for no local cap.
TYPE_LIMITS = ("job_type", "free", "concurrency", "rate_count", "rate_per_ms")

# The fields of a daemon's hash ({prefix}:{<prefix>:global}:daemon:<id>), which beat.lua
# writes as field, value pairs. Older daemons write no types.
DAEMON_FIELDS = (
    "id", "host", "pid", "started_at", "concurrency", "queues", "types", "active",
    "last_heartbeat",
)  # fmt: skip

# The counters of a queue's totals hash, which the scripts count up; /stats shows each,
# at 0 until its first event.
TOTALS = (
    "enqueued", "completed", "retried", "failed", "cancelled", "recovered",
    "callbacks_sent", "callbacks_failed", "rate_limited", "concurrency_limited",
)  # fmt: skip
# Throughput is counted in a hash of buckets of this many ms (field: epoch ms // BUCKET_MS).
BUCKET_MS = 10_000


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt ended, as the ack script records it (ATTEMPT)."""

    job_id: str
    attempt: int
    outcome: str  # "completed", "retry", "failed" or "cancelled"
    value: bytes | str  # the result as JSON, or the error text
    retry_at: int = 0  # epoch ms, for "retry"
    finished_at: int = 0  # epoch ms: when the attempt ended


@dataclass(frozen=True, slots=True)
class TypeLimits:
    """A job type's limits across all daemons, as claims enforce them (0: none)."""

    job_type: str
    concurrency: int = 0
    rate_count: int = 0
    rate_per_ms: int = 0


@dataclass(frozen=True, slots=True)
class DaemonInfo:
    """A registered daemon as /stats shows it (DAEMON_FIELDS)."""

    id: str
    host: str
    pid: int
    started_at: int
    concurrency: int
    queues: tuple[str, ...]
    active: int
    last_heartbeat: int
    types: tuple[str, ...] = ()  # the job types it has handlers for


def new_job_args(job: Job) -> list[Any]:
    """One job's NEW_JOB entries for enqueue.lua."""
    return [
        job.id, job.type, orjson.dumps(job.payload), job.max_attempts, job.run_at or 0,
        job.idempotency_key or "", job.callback_url or "", job.priority, job.created_at,
        job.trace or "", id_bytes(job.id),
    ]  # fmt: skip


def id_bytes(job_id: str) -> bytes:
    """A job id's 16 bytes, as the paged index holds it (index.lua, id_bytes)."""
    return bytes.fromhex(job_id.replace("-", ""))


def id_text(raw: bytes) -> str:
    """A job id from its 16 bytes in the paged index."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def attempt_args(a: Attempt) -> list[Any]:
    """One attempt's ATTEMPT entries for ack.lua."""
    return [a.job_id, a.attempt, a.outcome, a.value, a.retry_at, a.finished_at]


def type_limits_args(spec: TypeLimits, free: int) -> list[Any]:
    """One type's TYPE_LIMITS entries for claim.lua."""
    return [spec.job_type, free, spec.concurrency, spec.rate_count, spec.rate_per_ms]


def daemon_args(info: DaemonInfo) -> list[Any]:
    """A daemon's hash as the field, value pairs beat.lua writes."""
    values = {
        **{name: getattr(info, name) for name in DAEMON_FIELDS},
        "queues": orjson.dumps(list(info.queues)),
        "types": orjson.dumps(list(info.types)),
    }
    return [item for name in DAEMON_FIELDS for item in (name, values[name])]


def decode_job(fields: Mapping[bytes, bytes], queue: str, job_id: str) -> Job:
    """A job from its hash (HGETALL) at the key of `queue` and `job_id`."""
    named: dict[str, Any] = {key.decode(): value for key, value in fields.items()}
    named["id"], named["queue"] = job_id, queue
    return _job(named)


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    """A final job as the archive takes it: its ARCHIVED values by position, as Redis
    holds them (bytes: JSON as text, times as epoch ms; None where the job has none), with
    the defaults of absent fields and the history entry its record implies filled in. Not
    a Job: the archiver writes thousands a second, and parsing each value only to write it
    out again cost more than the rest of the archiving."""

    id: str
    queue: str
    finished_at: int  # epoch ms
    values: tuple[bytes | None, ...]

    @property
    def size(self) -> int:
        """Its bytes, near enough: those of the values without a bound of their own."""
        v = self.values
        return sum(len(v[i] or b"") for i in _UNBOUNDED)


_AT = {name: i for i, name in enumerate(ARCHIVED)}
_STATE, _ATTEMPTS, _STARTED_AT, _FINISHED_AT = (
    _AT["state"], _AT["attempts"], _AT["started_at"], _AT["finished_at"],
)  # fmt: skip
_DAEMON, _ERROR, _HISTORY = _AT["daemon"], _AT["error"], _AT["history"]
_UNBOUNDED = (_AT["payload"], _AT["result"], _ERROR, _HISTORY)
_FINAL_RAW = frozenset(state.encode() for state in FINAL_STATES)
# The values the archive stores for fields a hash leaves out at their default.
_ARCHIVED_DEFAULTS = {
    _AT["attempts"]: b"0",
    _AT["priority"]: str(DEFAULT_PRIORITY).encode(),
    _AT["max_attempts"]: b"1",
}


def decode_archive_record(
    fields: list[bytes | None] | bytes | None, queue: str, job_id: str
) -> ArchiveRecord | None:
    """A final job from its ARCHIVED fields by position (HMGET), or from a kept copy's
    JSON text (lua/lib.lua, keep_for_archive); None if the job is gone or not final."""
    values = _kept_values(fields) if isinstance(fields, bytes) else fields
    if not values or values[_STATE] not in _FINAL_RAW:
        return None
    for i, default in _ARCHIVED_DEFAULTS.items():
        if values[i] is None:
            values[i] = default
    values[_HISTORY] = _settled_history(values)
    return ArchiveRecord(job_id, queue, int(values[_FINISHED_AT] or 0), tuple(values))


def _kept_values(copy: bytes) -> list[bytes | None] | None:
    """The ARCHIVED values of a kept copy (lua/lib.lua, keep_for_archive: a JSON array of
    the hash's field, value pairs); None for one that is not (a copy of a hash already
    gone is "{}"), which is dropped rather than stopping its queue's archiving."""
    try:
        pairs = orjson.loads(copy)
        named = dict(zip(pairs[::2], pairs[1::2], strict=True))
        return [None if (value := named.get(name)) is None else value.encode() for name in ARCHIVED]
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
        return None


def _settled_history(v: Sequence[bytes | None]) -> bytes:
    """The history JSON with the entry the record implies (see _history_of): the archive
    keeps every attempt. By position: this runs for every job archived."""
    return orjson.dumps(
        _history_of(
            v[_HISTORY], v[_STATE], v[_ATTEMPTS], v[_STARTED_AT], v[_DAEMON], v[_FINISHED_AT],
            v[_ERROR],
        )
    )  # fmt: skip


def decode_claimed(flat: Sequence[Any], queue: str, daemon_id: str) -> list[Job]:
    """The jobs claim.lua answered (CLAIMED_JOB entries each), now active in this daemon."""
    # Unpacked by position, not through a dict by name as decode_job does: this runs for
    # every job a daemon starts, and by name it took nearly twice as long per job.
    # The unpacking below names CLAIMED_JOB's entries in order (a test holds them equal).
    rows = zip(*[iter(flat)] * len(CLAIMED_JOB), strict=True)
    return [
        Job(
            id=job_id.decode(),
            type=job_type.decode(),
            queue=queue,
            payload=orjson.loads(payload),
            state=ACTIVE,
            attempts=int(attempts),
            created_at=int(created_at),
            max_attempts=int(max_attempts),
            started_at=int(started_at),
            daemon=daemon_id,
            waited_ms=int(waited_ms),
            callback_url=callback_url.decode() or None,
            earlier_attempts=int(earlier_attempts),
            trace=trace.decode() if trace else None,
        )
        for (
            job_id, job_type, payload, attempts, created_at, max_attempts, started_at,
            waited_ms, callback_url, earlier_attempts, trace,
        ) in rows
    ]  # fmt: skip


def decode_daemon(fields: Mapping[bytes, bytes]) -> DaemonInfo:
    """A daemon from its hash (HGETALL)."""
    f = {key.decode(): value for key, value in fields.items()}
    return DaemonInfo(
        id=f["id"].decode(),
        host=f["host"].decode(),
        pid=int(f["pid"]),
        started_at=int(f["started_at"]),
        concurrency=int(f["concurrency"]),
        queues=tuple(orjson.loads(f["queues"])),
        active=int(f["active"]),
        last_heartbeat=int(f["last_heartbeat"]),
        # Daemons of an older taskd do not say: taken as knowing none.
        types=tuple(orjson.loads(f["types"])) if "types" in f else (),
    )


def _job(f: Mapping[str, Any]) -> Job:
    """A job from its fields by name: bytes from Redis, or str and int given here."""
    return Job(
        id=_text(f["id"]),
        type=_text(f["type"]),
        queue=_text(f["queue"]),
        payload=orjson.loads(f["payload"]),
        state=_text(f["state"]),
        attempts=int(f.get("attempts", 0)),
        created_at=int(f["created_at"]),
        started_at=_opt_int(f.get("started_at")),
        finished_at=_opt_int(f.get("finished_at")),
        result=orjson.loads(f["result"]) if f.get("result") else None,
        error=_opt_text(f.get("error")),
        daemon=_opt_text(f.get("daemon")),
        max_attempts=int(f.get("max_attempts", 1)),
        run_at=_opt_int(f.get("run_at")),
        cancel_requested="cancel_requested" in f,
        history=_history(f),
        waited_ms=int(f.get("waited_ms", 0)),
        idempotency_key=_opt_text(f.get("idempotency_key")),
        progress=_progress(f),
        callback_url=_opt_text(f.get("callback_url")),
        priority=int(f.get("priority", DEFAULT_PRIORITY)),
        waiting_for=_opt_text(f.get("waiting_for")),
        earlier_attempts=int(f.get("earlier_attempts", 0)),
        trace=_opt_text(f.get("trace")),
    )


def _history(f: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """A job's history, from its hash's fields by name (see _history_of)."""
    return _history_of(
        f.get("history"), f["state"], f.get("attempts"), f.get("started_at"),
        f.get("daemon"), f.get("finished_at"), f.get("error"),
    )  # fmt: skip


def _history_of(
    history_json: Any,
    state_raw: Any,
    attempts: Any,
    started_raw: Any,
    daemon: Any,
    finished_at: Any,
    error: Any,
) -> tuple[dict[str, Any], ...]:
    """The stored entries, and the one the record implies: the ack does not write the
    entry of an attempt that ends its job, since the record already says it all; every
    other way out of an attempt clears started_at (lua/lib.lua, history_entry). Takes the
    fields as the hash holds them (bytes, or None where it has none)."""
    history = tuple(orjson.loads(history_json)) if history_json else ()
    state = _text(state_raw)
    if state not in FINAL_STATES or not started_raw:
        return history
    attempt, started_at = int(attempts or 0), int(started_raw)
    if history and (history[-1].get("attempt"), history[-1].get("started_at")) == (
        attempt,
        started_at,
    ):
        return history  # written by a daemon of an older taskd, which stored it
    implied = {
        "attempt": attempt,
        "daemon": _opt_text(daemon),
        "started_at": started_at,
        "finished_at": _opt_int(finished_at),
        "outcome": state,
        "error": None if state == "completed" else _opt_text(error),
    }
    return (*history, implied)


def _progress(f: Mapping[str, Any]) -> tuple[float, str, int] | None:
    if "progress" not in f:
        return None
    return float(f["progress"]), _text(f["progress_message"]), int(f["progress_at"])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt_text(raw: Any) -> str | None:
    return _text(raw) if raw else None


def _opt_int(raw: Any) -> int | None:
    return int(raw) if raw else None
