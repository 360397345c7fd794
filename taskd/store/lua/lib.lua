-- Functions the scripts share. Redis 6.2 scripts cannot include one another, so the store
-- puts this text in front of every script before loading it (scripts.py).
--
-- The ARGV header: every queue script that uses the time, the job hash prefix or the limit
-- key prefix takes them first, in this order, and its own arguments from ARGV[4]:
--   ARGV[1] -> now, epoch ms (NOW)
--   ARGV[2] -> <prefix>:{<queue>}:job:, the queue's job hash prefix (JOB)
--   ARGV[3] -> <prefix>:{<queue>}:limit:, the queue's limit key prefix (LIMIT)
-- A script that uses none of them takes no header (its own header says so), and NOW, JOB
-- and LIMIT mean nothing there. The job hash's fields and the positional entries scripts
-- take and answer are declared in record.py.
local NOW = tonumber(ARGV[1])
local JOB = ARGV[2]
local LIMIT = ARGV[3]
--
-- A queue's ready jobs wait in its inbox (<prefix>:{<queue>}:ready, the list daemons block
-- on) or in one list per priority (<prefix>:{<queue>}:ready:0 to :9). A job goes to the
-- inbox while the list of its priority is empty and the inbox holds fewer than INBOX_MAX
-- ids, else to its priority's list. So a daemon that found the queue empty and blocks on
-- the inbox is woken by the next job whatever its priority, a backlog waits in the
-- priority lists, and every inbox id of a priority is older than the ids in that
-- priority's list: a claim takes, for each priority from 9 down, the inbox's ids and then
-- the list's.
local INBOX_MAX = 1000
-- The priority of a job without one (jobs.DEFAULT_PRIORITY).
local DEFAULT_PRIORITY = 5

local function priority_list(inbox, priority)
  return inbox .. ':' .. priority
end

-- The list a job of this priority joins now, counted as joined. `seen` caches list
-- lengths within one script call (pass a table to reuse it; nil for none).
local function ready_list_for(inbox, priority, seen)
  seen = seen or {}
  local list = priority_list(inbox, priority)
  seen[list] = seen[list] or redis.call('LLEN', list)
  if seen[list] == 0 then
    seen[inbox] = seen[inbox] or redis.call('LLEN', inbox)
    if seen[inbox] < INBOX_MAX then
      list = inbox
    end
  end
  seen[list] = seen[list] + 1
  return list
end

-- What a claim reads of a queued job (read_job), and where each field is in the answer:
-- f[STATE] and so on (nil where the hash has none). By position, not by name: a claim
-- reads every job it examines, and filling a table by name cost more than the read.
local READ = {'state', 'type', 'payload', 'created_at', 'max_attempts', 'run_at',
  'callback_url', 'priority', 'attempts', 'waiting_for', 'earlier_attempts', 'trace'}
local STATE, TYPE, PAYLOAD, CREATED_AT, MAX_ATTEMPTS, RUN_AT, CALLBACK_URL, PRIORITY,
  ATTEMPTS, WAITING_FOR, EARLIER_ATTEMPTS, TRACE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12

local function read_job(job_key)
  return redis.call('HMGET', job_key, unpack(READ))
end

-- A job's priority, of its fields as read_job reads them.
local function priority_of(f)
  return tonumber(f[PRIORITY] or DEFAULT_PRIORITY)
end

-- When a job became due: at its run_at (promoted, retried, returned), else its creation.
local function due_of(f)
  return tonumber(f[RUN_AT] or f[CREATED_AT])
end

-- Make a job ready: at the consuming end (front) to run next, else at the back.
local function make_ready(inbox, job_key, id, front)
  local priority = redis.call('HGET', job_key, 'priority') or DEFAULT_PRIORITY
  redis.call(front and 'RPUSH' or 'LPUSH', ready_list_for(inbox, priority), id)
end

-- Remove a queued job's id from wherever it waits: its type's line of held jobs, or the
-- ready lists (a landed id stays: the claim that takes it skips a job no longer queued).
local function remove_queued(inbox, job_key, id)
  local f = redis.call('HMGET', job_key, 'priority', 'waiting_for', 'type')
  if f[2] == 'concurrency' then
    redis.call('ZREM', LIMIT .. f[3] .. ':line', id)
  elseif redis.call('LREM', inbox, 1, id) == 0 then
    redis.call('LREM', priority_list(inbox, f[1] or DEFAULT_PRIORITY), 1, id)
  end
end

-- Ids of the jobs drop_job deleted in this script call, for unindex() to take out of the
-- queue's index in one pass.
local dropped = {}

-- Delete a job that is not running: its record, and the idempotency key that names it, so
-- that a resubmission with that key makes a new job (as it would once the key's job is
-- gone: enqueue.lua). Its id in the list or set of its state is the caller's to remove,
-- and its id in the index too: a script that drops jobs ends with unindex(dropped).
-- `idem`: the queue's idempotency key prefix (keys.idempotency_prefix).
local function drop_job(job_key, id, idem)
  local key = redis.call('HGET', job_key, 'idempotency_key')
  if key and redis.call('GET', idem .. key) == id then
    redis.call('DEL', idem .. key)
  end
  redis.call('DEL', job_key)
  dropped[#dropped + 1] = id
end

-- Move up to `most` ids from `from` to the consuming end of `to`, keeping their order:
-- pushed last to first, so that the first taken from `from` is taken first again.
local function move_to_front(from, to, most)
  local ids = redis.call('RPOP', from, most) or {}
  for i = #ids, 1, -1 do
    redis.call('RPUSH', to, ids[i])
  end
  return #ids
end

-- Let up to `most` of a type's held jobs (base: its limit keys, LIMIT .. type) go back to
-- the front of the ready jobs, best first; returns how many.
local function free_held(inbox, base, most)
  local freed = redis.call('ZPOPMIN', base .. ':line', most)
  for i = #freed - 1, 1, -2 do
    redis.call('HDEL', JOB .. freed[i], 'waiting_for')
    make_ready(inbox, JOB .. freed[i], freed[i], true)
  end
  return #freed / 2
end

-- A job's history is a JSON array of one entry per finished attempt, but the entry of an
-- attempt that ended the job (ack.lua) is not written: it is what the record already says
-- (attempts, daemon, started_at, finished_at, state, error), and readers add it while the
-- job is in a final state with a started_at (record.py, _history). Every other way
-- a job leaves an attempt clears started_at, so the rule cannot mistake one for another;
-- a script that takes a job out of its final state writes the entry first (settle_history).

-- One history entry (a JSON object text): attempt and times are numbers (or nil), `err`
-- text or nil. Written by hand: a table and cjson.encode cost more, once per job.
local function history_entry(attempt, daemon, started, finished, outcome, err)
  return '{"attempt":' .. attempt .. ',"daemon":' .. cjson.encode(daemon) ..
    ',"started_at":' .. (started or 'null') .. ',"finished_at":' .. finished ..
    ',"outcome":"' .. outcome .. '","error":' .. (err and cjson.encode(err) or 'null') .. '}'
end

-- A job's history (a JSON array text, or false for none) with one entry (JSON object text)
-- appended.
local function with_entry(history, entry)
  if history then
    return string.sub(history, 1, -2) .. ',' .. entry .. ']'
  end
  return '[' .. entry .. ']'
end

-- Append an entry (JSON object text) to a job's history.
local function append_history(job_key, entry)
  redis.call('HSET', job_key, 'history', with_entry(redis.call('HGET', job_key, 'history'), entry))
end

-- What settled() reads of a job, in this order.
local SETTLE = {'state', 'started_at', 'attempts', 'daemon', 'finished_at', 'error', 'history'}

-- A job's history with the entry its record implies written in (see above), as JSON text,
-- or false for none: `f` holds its SETTLE fields. Unchanged unless the job is in a final
-- state with a started_at, and the entry is not there already (an older taskd's ack
-- stored it).
local function settled(f)
  if not (f[2] and (f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled')) then
    return f[7]
  end
  if f[7] then
    local entries = cjson.decode(f[7])
    local last = entries[#entries]
    if last and tonumber(last.attempt) == tonumber(f[3])
        and tonumber(last.started_at) == tonumber(f[2]) then
      return f[7]
    end
  end
  local err = f[1] ~= 'completed' and f[6] or nil
  return with_entry(f[7], history_entry(f[3], f[4], f[2], f[5], f[1], err))
end

-- Write the implied entry of a job in a final state into its history, before the job
-- leaves that state.
local function settle_history(job_key)
  local f = redis.call('HMGET', job_key, unpack(SETTLE))
  local history = settled(f)
  if history ~= f[7] then
    redis.call('HSET', job_key, 'history', history)
  end
end

-- Most values one command takes from a Lua table: unpack() fails past a few thousand.
-- Even, so that score, member pairs never split.
local CHUNK = 1000

-- Call `command` on `key` with the values of `items`, CHUNK at a time.
local function call_chunked(command, key, items)
  for i = 1, #items, CHUNK do
    redis.call(command, key, unpack(items, i, math.min(i + CHUNK - 1, #items)))
  end
end

-- The scores of `ids` in a sorted set, by position (false: not a member), CHUNK at a time.
local function scores_of(set, ids)
  local scores = {}
  for i = 1, #ids, CHUNK do
    for _, score in ipairs(redis.call('ZMSCORE', set, unpack(ids, i, math.min(i + CHUNK - 1, #ids)))) do
      scores[#scores + 1] = score
    end
  end
  return scores
end

-- Give back the slot a job held of its type's global_concurrency (if it held one). Held
-- jobs stay in their line, which claims walk best first; the best one's id goes to the
-- front of the inbox only as a wake-up call, so that a daemon blocked on it claims.
-- `job_type`: the job's type, or nil to read it.
local function release_slot(inbox, job_key, id, job_type)
  local base = LIMIT .. (job_type or redis.call('HGET', job_key, 'type') or '')
  if redis.call('ZREM', base .. ':running', id) == 1 then
    local best = redis.call('ZRANGE', base .. ':line', 0, 0)[1]
    if best then
      redis.call('RPUSH', inbox, best)
    end
  end
end

-- What finishing jobs adds besides their records: their ids to their state's set, the
-- queue's totals (the counter named as the state), for a job that asked for a callback
-- its id to the queue's outbox, and, when the daemon archives, its id to the queue's
-- archive hand-off (scored by when it ended), in the same step, so that neither the
-- callback nor the archive entry can be lost to a crash (callbacks.py, archiver.py send
-- them). Gathered over a script call and written at its end, one command per set,
-- counter, outbox and hand-off however many jobs ended: a script that finishes jobs names
-- its keys first (finish_into) and ends with flush_finished().
local ended = {totals = false, outbox = false, archive = false, sets = {}, order = {},
  counts = {}, calls = {}, handoff = {}}

-- `archive`: the queue's archive hand-off (keys.archive), or '' when the daemon running
-- the script does not archive.
local function finish_into(totals, outbox, archive)
  ended.totals, ended.outbox = totals, outbox
  ended.archive = archive ~= '' and archive
end

-- End a job in a final state ('completed', 'failed' or 'cancelled'): its record (state,
-- finished_at and the field, value pairs of `fields`), its state's set, the totals, its
-- callback and its archive entry. `callback`: whether the job has a callback_url, or nil
-- to read. `at`: when it ended (epoch ms), or nil for NOW.
local function finish_job(job_key, id, state, finished_set, fields, callback, at)
  at = at or NOW
  redis.call('HSET', job_key, 'state', state, 'finished_at', at, unpack(fields or {}))
  local set = ended.sets[finished_set]
  if not set then
    set = {}
    ended.sets[finished_set] = set
    ended.order[#ended.order + 1] = finished_set
  end
  set[#set + 1] = NOW
  set[#set + 1] = id
  ended.counts[state] = (ended.counts[state] or 0) + 1
  if callback == nil then
    callback = redis.call('HEXISTS', job_key, 'callback_url') == 1
  end
  if callback then
    ended.calls[#ended.calls + 1] = id
  end
  if ended.archive then
    ended.handoff[#ended.handoff + 1] = at
    ended.handoff[#ended.handoff + 1] = id
  end
end

-- Write what finish_job gathered in this script call.
local function flush_finished()
  for _, set in ipairs(ended.order) do
    call_chunked('ZADD', set, ended.sets[set])
  end
  for state, count in pairs(ended.counts) do
    redis.call('HINCRBY', ended.totals, state, count)
  end
  call_chunked('LPUSH', ended.outbox, ended.calls)
  if ended.archive then
    call_chunked('ZADD', ended.archive, ended.handoff)
  end
  ended.sets, ended.order, ended.counts, ended.calls, ended.handoff = {}, {}, {}, {}, {}
end

-- The archive hand-off (keys.archive) is a sorted set, scored by when each job ended, of
-- the ids of final jobs whose record is still to be written to the archive: the archiver
-- reads the record it names when it takes the entry. A record that leaves its final
-- state before then (retried, deleted) would take its final state with it, so the script
-- that changes it first keeps a copy: the entry becomes <id>@<finished_at>, its copy the
-- field of that name in <archive>:kept (a JSON array of the hash's field, value pairs).
-- `archive`: the hand-off, whether or not the daemon archives: a job another daemon
-- handed off is kept all the same.
local function keep_for_archive(archive, job_key, id)
  local score = redis.call('ZSCORE', archive, id)
  if not score then
    return
  end
  local kept = id .. '@' .. (redis.call('HGET', job_key, 'finished_at') or score)
  redis.call('HSET', archive .. ':kept', kept, cjson.encode(redis.call('HGETALL', job_key)))
  redis.call('ZREM', archive, id)
  redis.call('ZADD', archive, score, kept)
end

-- Put a failed job back on its queue, its id already out of the failed set (retry.lua,
-- retry_dead.lua): its attempts reset, those it had added to its earlier_attempts (the
-- count of every attempt it has had goes on, and names each attempt to the endpoints it
-- is sent to: taskd.signing), due from now (run_at), so that its wait counts from the
-- retry, not from its creation. A final record not yet archived is kept for the archive
-- first. `archive`: the hand-off (keep_for_archive).
local function retry_failed(inbox, job_key, id, archive)
  keep_for_archive(archive, job_key, id)
  settle_history(job_key)
  local attempts = tonumber(redis.call('HGET', job_key, 'attempts') or 0)
  if attempts > 0 then
    redis.call('HINCRBY', job_key, 'earlier_attempts', attempts)
  end
  redis.call('HSET', job_key, 'state', 'queued', 'attempts', 0, 'run_at', NOW)
  redis.call('HDEL', job_key, 'started_at', 'finished_at', 'error', 'result')
  make_ready(inbox, job_key, id, false)
end

-- A job that stops running (given back, or taken back from a dead daemon) and that
-- someone asked to cancel meanwhile ends cancelled; returns whether it did. Needs
-- finish_into, as finish_job does.
local function cancel_if_requested(job_key, id, cancelled_set)
  if redis.call('HEXISTS', job_key, 'cancel_requested') == 0 then
    return false
  end
  redis.call('HDEL', job_key, 'cancel_requested')
  finish_job(job_key, id, 'cancelled', cancelled_set, {'error', 'cancelled'})
  return true
end

-- Push timing samples (ms) onto a capped list, newest first, keeping the latest `keep`.
local function push_samples(list, samples, keep)
  if #samples > 0 then
    call_chunked('LPUSH', list, samples)
    redis.call('LTRIM', list, 0, tonumber(keep) - 1)
  end
end
