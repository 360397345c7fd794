-- Return a daemon's unfinished jobs of one queue to the consuming end of the ready list,
-- so they run next. Active jobs get their attempt back: the daemon stopped them, they did
-- not fail. Moves a bounded batch; call again until it returns 0.
-- KEYS[1] -> the queue's ready list
-- KEYS[2] -> the daemon's landing list for the queue
-- KEYS[3] -> the daemon's active set for the queue
-- ARGV[1] -> the queue's job hash prefix
-- ARGV[2] -> most jobs to move
-- Returns the number of jobs moved.
local limit = tonumber(ARGV[2])
local moved = 0
local landed = redis.call('RPOP', KEYS[2], limit)
if landed then
  for _, id in ipairs(landed) do
    redis.call('RPUSH', KEYS[1], id)
  end
  moved = #landed
end
if moved < limit then
  local active = redis.call('ZRANGE', KEYS[3], 0, limit - moved - 1)
  for _, id in ipairs(active) do
    local key = ARGV[1] .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'attempts', -1)
      redis.call('HSET', key, 'state', 'queued')
      redis.call('HDEL', key, 'started_at')
      redis.call('RPUSH', KEYS[1], id)
    end
    redis.call('ZREM', KEYS[3], id)
  end
  moved = moved + #active
end
return moved
