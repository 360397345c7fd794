-- Record how attempts of one queue's jobs ended, and take them out of the daemon's active
-- set. An attempt is recorded only while it is still this daemon's: the id is in its
-- active set with the same attempt number. Otherwise the job was taken back meanwhile
-- (by a reaper, after this daemon was taken for dead) and a newer attempt owns the record.
-- A recorded attempt gives back its slot of its type's global_concurrency (lib.lua).
--
-- A daemon acks every job it runs, so the per-job work is one read and one write of the
-- job's hash; the active set, the finished sets, the counters and the samples are written
-- once per call, for all its attempts.
-- KEYS[1] -> <prefix>:{<queue>}:active:<daemon>, this daemon's active set
-- KEYS[2] -> <prefix>:{<queue>}:completed
-- KEYS[3] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[4] -> <prefix>:{<queue>}:scheduled, where retries wait
-- KEYS[5] -> <prefix>:{<queue>}:cancelled
-- KEYS[6] -> <prefix>:{<queue>}:totals
-- KEYS[7] -> <prefix>:{<queue>}:throughput
-- KEYS[8] -> <prefix>:{<queue>}:runs, recent run times
-- KEYS[9] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox), where a held job goes when freed
-- KEYS[10] -> <prefix>:{<queue>}:callbacks, the outbox a final job with a callback joins
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (the header, lib.lua)
-- ARGV[4] -> the current throughput bucket
-- ARGV[5] -> how many recent run times to keep
-- ARGV[6] -> this daemon's id, for the history entries of retries
-- ARGV[7] -> <prefix>:{<queue>}:archive, the archive hand-off, or '' (lib.lua, finish_into)
-- ARGV[8..] -> 6 entries per attempt (record.ATTEMPT): id, attempt number, outcome
--   ('completed', 'retry', 'failed' or 'cancelled'), result JSON (completed) or error
--   text, retry time in epoch ms (retry) or 0, when the attempt ended (epoch ms)
-- Returns, per attempt in order, 1 if it was recorded, else 0.
local FIRST, ENTRIES = 8, 6
local daemon = ARGV[6]
finish_into(KEYS[6], KEYS[10], ARGV[7])

local ids = {}
for i = FIRST, #ARGV, ENTRIES do
  ids[#ids + 1] = ARGV[i]
end
local owned = scores_of(KEYS[1], ids)

-- Per job type: whether any of its jobs holds a global_concurrency slot (its running set
-- exists), read once per call; only then can a job of it have a slot to give back.
local limited = {}
local function release(key, id, job_type)
  if limited[job_type] == nil then
    limited[job_type] = redis.call('EXISTS', LIMIT .. job_type .. ':running') == 1
  end
  if limited[job_type] then
    release_slot(KEYS[9], key, id, job_type)
  end
end

local recorded = {}
local acked = {}
local seen = {}
local finished = 0
local retried = 0
local runs = {}

-- Record one attempt whose job's hash read `f` (attempts, type, started_at, history,
-- callback_url, cancel_requested, error). An attempt that ends the job leaves its history
-- entry implied by the record (lib.lua); a retry writes it.
local function record(i, key, f)
  local id, outcome, value, ended_at = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 5]
  acked[#acked + 1] = id
  release(key, id, f[2])
  local started = tonumber(f[3])
  if started then
    -- At least 0: the attempt's end is this daemon's clock, its start the claim's.
    runs[#runs + 1] = math.max(0, ended_at - started)
  end
  -- Fields an earlier attempt or request left that this end clears.
  local clear = {}
  if f[6] then
    clear[#clear + 1] = 'cancel_requested'
  end
  if outcome == 'completed' and f[7] then
    clear[#clear + 1] = 'error'
  end
  if outcome == 'retry' then
    clear[#clear + 1] = 'started_at'
  end
  if #clear > 0 then
    redis.call('HDEL', key, unpack(clear))
  end
  local callback = f[5] and true or false
  if outcome == 'completed' then
    finished = finished + 1
    finish_job(key, id, 'completed', KEYS[2], {'result', value}, callback, ended_at)
  elseif outcome == 'retry' then
    retried = retried + 1
    local entry = history_entry(ARGV[i + 1], daemon, f[3], ended_at, outcome, value)
    redis.call('HSET', key, 'state', 'scheduled', 'run_at', ARGV[i + 4], 'error', value,
      'history', with_entry(f[4], entry))
    redis.call('ZADD', KEYS[4], ARGV[i + 4], id)
  elseif outcome == 'failed' then
    finished = finished + 1
    finish_job(key, id, 'failed', KEYS[3], {'error', value}, callback, ended_at)
  else
    finish_job(key, id, 'cancelled', KEYS[5], {'error', value}, callback, ended_at)
  end
end

for n, id in ipairs(ids) do
  local i = FIRST + (n - 1) * ENTRIES
  local ok = false
  -- The same attempt twice in one call is recorded once.
  if owned[n] and not seen[id] then
    local key = JOB .. id
    local f = redis.call('HMGET', key, 'attempts', 'type', 'started_at', 'history',
      'callback_url', 'cancel_requested', 'error')
    if f[1] == ARGV[i + 1] then
      seen[id] = true
      record(i, key, f)
      ok = true
    end
  end
  recorded[#recorded + 1] = ok and 1 or 0
end

call_chunked('ZREM', KEYS[1], acked)
flush_finished()
if retried > 0 then
  redis.call('HINCRBY', KEYS[6], 'retried', retried)
end
if finished > 0 then
  redis.call('HINCRBY', KEYS[7], ARGV[4], finished)
end
push_samples(KEYS[8], runs, ARGV[5])
return recorded
