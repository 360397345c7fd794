-- Claim up to ARGV[1] jobs of one queue for one daemon: first the id its blocking fetch
-- landed, then ids from the ready list. Each claimed id enters the daemon's active set in
-- the same step as it leaves the list, so a job is never only in a daemon's memory, and
-- the daemon's lease on the queue is renewed, so a reaper knows to look at its set. A
-- paused queue gives nothing, and a landed id goes back to the front of the ready list.
-- KEYS[1] -> the queue's ready list
-- KEYS[2] -> this daemon's landing list for the queue
-- KEYS[3] -> this daemon's active set for the queue
-- KEYS[4] -> the queue's owners (daemon leases)
-- KEYS[5] -> the queue's paused flag
-- KEYS[6] -> the queue's list of recent wait times
-- ARGV[1] -> most jobs to claim, >= 1
-- ARGV[2] -> now, epoch ms
-- ARGV[3] -> the queue's job hash prefix
-- ARGV[4] -> this daemon's id, recorded on the job
-- ARGV[5] -> how many recent wait times to keep
-- Returns a flat array of 9 entries per claimed job: id, type, payload, attempts,
--   created_at, max_attempts, started_at, ms waited since due, callback URL (or '');
-- or the single entry 'paused'.
local limit = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local out = {}
local waits = {}

redis.call('ZADD', KEYS[4], now, ARGV[4])
if redis.call('EXISTS', KEYS[5]) == 1 then
  local landed = redis.call('RPOP', KEYS[2], limit)
  if landed then
    for _, id in ipairs(landed) do
      redis.call('RPUSH', KEYS[1], id)
    end
  end
  return {'paused'}
end

local function claim(ids)
  for _, id in ipairs(ids) do
    local key = ARGV[3] .. id
    local f = redis.call('HMGET', key, 'state', 'type', 'payload', 'created_at', 'max_attempts',
      'run_at', 'callback_url')
    -- Only a queued job runs: a stray id of a deleted or cancelled job is dropped.
    if f[1] == 'queued' then
      -- Waiting starts when the job is due: at its run_at, else when it was created. The
      -- claim's time is read before the call waits for a connection, so a job can be
      -- newer than it: such a job starts when it was due, not before.
      local due = tonumber(f[6] or f[4])
      local started = math.max(now, due)
      redis.call('ZADD', KEYS[3], now, id)
      local attempts = redis.call('HINCRBY', key, 'attempts', 1)
      redis.call('HSET', key, 'state', 'active', 'started_at', started, 'daemon', ARGV[4])
      redis.call('HDEL', key, 'run_at')
      waits[#waits + 1] = started - due
      out[#out + 1] = id
      out[#out + 1] = f[2]
      out[#out + 1] = f[3]
      out[#out + 1] = attempts
      out[#out + 1] = f[4]
      out[#out + 1] = f[5]
      out[#out + 1] = started
      out[#out + 1] = started - due
      out[#out + 1] = f[7] or ''
    end
  end
  return #ids
end

local landed = redis.call('RPOP', KEYS[2], limit)
if landed then
  limit = limit - claim(landed)
end
if limit > 0 then
  local ready = redis.call('RPOP', KEYS[1], limit)
  if ready then
    claim(ready)
  end
end
if #waits > 0 then
  redis.call('LPUSH', KEYS[6], unpack(waits))
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[5]) - 1)
end
return out
