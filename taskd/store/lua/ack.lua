-- Record how attempts of one queue's jobs ended, and take them out of the daemon's active
-- set. An attempt is recorded only while it is still this daemon's: the id is in its
-- active set with the same attempt number. Otherwise the job was taken back meanwhile
-- (by a reaper, after this daemon was taken for dead) and a newer attempt owns the record.
-- A recorded attempt gives back its slot of its type's global_concurrency (lib.lua).
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
-- ARGV[6..] -> 6 entries per attempt (record.ATTEMPT): id, attempt number, outcome
--   ('completed', 'retry', 'failed' or 'cancelled'), result JSON (completed) or error
--   text, retry time in epoch ms (retry) or 0, history entry (a JSON object) to append
-- Returns, per attempt in order, 1 if it was recorded, else 0.
local recorded = {}
local finished = 0
local runs = {}

for i = 6, #ARGV, 6 do
  local id, attempt, outcome, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = JOB .. id
  if redis.call('ZSCORE', KEYS[1], id) and redis.call('HGET', key, 'attempts') == attempt then
    redis.call('ZREM', KEYS[1], id)
    release_slot(KEYS[9], key, id)
    append_history(key, ARGV[i + 5])
    local started = redis.call('HGET', key, 'started_at')
    if started then
      runs[#runs + 1] = NOW - tonumber(started)
    end
    if outcome == 'completed' or outcome == 'failed' then
      finished = finished + 1
    end
    redis.call('HDEL', key, 'cancel_requested')
    if outcome == 'completed' then
      redis.call('HSET', key, 'result', value)
      redis.call('HDEL', key, 'error')
      finish_job(key, id, 'completed', KEYS[2], KEYS[6], KEYS[10])
    elseif outcome == 'retry' then
      redis.call('HSET', key, 'state', 'scheduled', 'run_at', ARGV[i + 4], 'error', value)
      redis.call('HDEL', key, 'started_at')
      redis.call('ZADD', KEYS[4], ARGV[i + 4], id)
      redis.call('HINCRBY', KEYS[6], 'retried', 1)
    elseif outcome == 'failed' then
      finish_job(key, id, 'failed', KEYS[3], KEYS[6], KEYS[10], value)
    else
      finish_job(key, id, 'cancelled', KEYS[5], KEYS[6], KEYS[10], value)
    end
    recorded[#recorded + 1] = 1
  else
    recorded[#recorded + 1] = 0
  end
end
if finished > 0 then
  redis.call('HINCRBY', KEYS[7], ARGV[4], finished)
end
push_samples(KEYS[8], runs, ARGV[5])
return recorded
