"""The archive's tables, as versioned migrations that taskd applies at start."""

from __future__ import annotations

# The archived jobs: one row per final attempt of a job (a dead letter retried and
# finished again is a second row). Partitioned by day of finished_at, so that keep_days
# drops whole partitions instead of deleting rows. Times are timestamptz, payload and
# result JSONB; history is the job's per-attempt history, as GET /jobs/ID shows it.
TABLE = "taskd_jobs"
# The applied migrations, one row per version.
VERSIONS = "taskd_schema_migrations"
# Taken by whoever migrates or adds partitions, so that daemons starting at once take
# turns (pg_advisory_xact_lock: released with the transaction).
LOCK_KEY = 0x7461736B64  # "taskd"

# Each migration is applied once, in order, in one transaction with its version row. Never
# edit one that has shipped: add the next.
MIGRATIONS: tuple[str, ...] = (
    # 1: the table. The key is the job and its final attempt: writing an entry twice (a
    # daemon that died between writing and removing it from the hand-off) changes nothing.
    f"""
    CREATE TABLE {TABLE} (
        id              text        NOT NULL,
        attempts        integer     NOT NULL,
        finished_at     timestamptz NOT NULL,
        queue           text        NOT NULL,
        type            text        NOT NULL,
        state           text        NOT NULL,
        payload         jsonb       NOT NULL,
        result          jsonb,
        error           text,
        priority        smallint    NOT NULL,
        idempotency_key text,
        max_attempts    integer     NOT NULL,
        created_at      timestamptz NOT NULL,
        started_at      timestamptz,
        daemon          text,
        callback_url    text,
        history         jsonb       NOT NULL,
        archived_at     timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (id, attempts, finished_at)
    ) PARTITION BY RANGE (finished_at)
    """,
    # 2: the indexes of GET /archive's filters, each newest first, as it lists; the key's
    # index serves GET /jobs/ID. jsonb_path_ops: smaller and faster than the default
    # opclass, and containment (@>) is the one operator `q` uses.
    f"""
    CREATE INDEX {TABLE}_finished ON {TABLE} (finished_at DESC, id DESC);
    CREATE INDEX {TABLE}_type ON {TABLE} (type, finished_at DESC, id DESC);
    CREATE INDEX {TABLE}_queue ON {TABLE} (queue, finished_at DESC, id DESC);
    CREATE INDEX {TABLE}_state ON {TABLE} (state, finished_at DESC, id DESC);
    CREATE INDEX {TABLE}_payload ON {TABLE} USING gin (payload jsonb_path_ops)
    """,
)
