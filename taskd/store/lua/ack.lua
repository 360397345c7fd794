-- Record how attempts of one queue's jobs ended, and take them out of the daemon's active
-- set. An attempt is recorded only while it is still this daemon's: the id is in its
-- active set with the same attempt number. Otherwise the job was taken back meanwhile
-- (by a reaper, after this daemon was taken for dead) and a newer attempt owns the record.
-- A recorded attempt gives back its slot of its type's global_concurrency (lib.lua).
-- KEYS[1] -> this daemon's active set for the queue
-- KEYS[2] -> the queue's completed set
-- KEYS[3] -> the queue's dead set (failed jobs)
-- KEYS[4] -> the queue's scheduled set (retries wait there)
-- KEYS[5] -> the queue's cancelled set
-- KEYS[6] -> the queue's totals hash
-- KEYS[7] -> the queue's throughput buckets
-- KEYS[8] -> the queue's list of recent run times
-- KEYS[9] -> the queue's inbox (its ready list), where a held job goes when freed
-- KEYS[10] -> the queue's callback outbox, which a final job with a callback_url joins
-- ARGV[1] -> now, epoch ms
-- ARGV[2] -> the queue's job hash prefix
-- ARGV[3] -> the current throughput bucket
-- ARGV[4] -> how many recent run times to keep
-- ARGV[5] -> the queue's limit key prefix
-- ARGV[6..] -> 6 entries per attempt:
--   id, attempt number, outcome ('completed', 'retry', 'failed' or 'cancelled'),
--   result JSON (completed) or error text, retry time in epoch ms (retry) or 0,
--   history entry (a JSON object) to append to the job's history
-- Returns, per attempt in order, 1 if it was recorded, else 0.
local now = ARGV[1]
local recorded = {}
local finished = 0
local runs = {}

local function finish(key, id, state, set, total)
  redis.call('HSET', key, 'state', state, 'finished_at', now)
  redis.call('ZADD', set, now, id)
  redis.call('HINCRBY', KEYS[6], total, 1)
  call_back(KEYS[10], key, id)
end

for i = 6, #ARGV, 6 do
  local id, attempt, outcome, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = ARGV[2] .. id
  if redis.call('ZSCORE', KEYS[1], id) and redis.call('HGET', key, 'attempts') == attempt then
    redis.call('ZREM', KEYS[1], id)
    release_slot(KEYS[9], ARGV[5], key, id)
    append_history(key, ARGV[i + 5])
    local started = redis.call('HGET', key, 'started_at')
    if started then
      runs[#runs + 1] = tonumber(now) - tonumber(started)
    end
    if outcome == 'completed' or outcome == 'failed' then
      finished = finished + 1
    end
    redis.call('HDEL', key, 'cancel_requested')
    if outcome == 'completed' then
      redis.call('HSET', key, 'result', value)
      redis.call('HDEL', key, 'error')
      finish(key, id, 'completed', KEYS[2], 'completed')
    elseif outcome == 'retry' then
      redis.call('HSET', key, 'state', 'scheduled', 'run_at', ARGV[i + 4], 'error', value)
      redis.call('HDEL', key, 'started_at')
      redis.call('ZADD', KEYS[4], ARGV[i + 4], id)
      redis.call('HINCRBY', KEYS[6], 'retried', 1)
    elseif outcome == 'failed' then
      redis.call('HSET', key, 'error', value)
      finish(key, id, 'failed', KEYS[3], 'failed')
    else
      redis.call('HSET', key, 'error', value)
      finish(key, id, 'cancelled', KEYS[5], 'cancelled')
    end
    recorded[#recorded + 1] = 1
  else
    recorded[#recorded + 1] = 0
  end
end
if finished > 0 then
  redis.call('HINCRBY', KEYS[7], ARGV[3], finished)
end
if #runs > 0 then
  redis.call('LPUSH', KEYS[8], unpack(runs))
  redis.call('LTRIM', KEYS[8], 0, tonumber(ARGV[4]) - 1)
end
return recorded
