-- Enqueue new jobs of one queue: write each record, index it, and either push its id on
-- the ready list or, when it has a time to wait for, put it in the scheduled set. One
-- call takes a bounded batch (the store sends at most ENQUEUE_CHUNK jobs per call).
-- KEYS[1] -> the queue's ready list
-- KEYS[2] -> the queue's scheduled set
-- KEYS[3] -> the queue's index
-- KEYS[4] -> the queue's totals hash
-- ARGV[1] -> the queue's job hash prefix
-- ARGV[2] -> the queue's name
-- ARGV[3] -> created_at, epoch ms
-- ARGV[4..] -> 5 entries per job: id, type, payload (JSON text), max_attempts,
--   run_at (epoch ms, or 0 to run now)
-- Returns how many jobs were added; a job whose id exists already is left unchanged.
local added = 0
for i = 4, #ARGV, 5 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'id', id, 'type', ARGV[i + 1], 'queue', ARGV[2],
      'payload', ARGV[i + 2], 'attempts', 0, 'max_attempts', ARGV[i + 3],
      'created_at', ARGV[3])
    if ARGV[i + 4] ~= '0' then
      redis.call('HSET', key, 'state', 'scheduled', 'run_at', ARGV[i + 4])
      redis.call('ZADD', KEYS[2], ARGV[i + 4], id)
    else
      redis.call('HSET', key, 'state', 'queued')
      redis.call('LPUSH', KEYS[1], id)
    end
    redis.call('ZADD', KEYS[3], 0, id)
    added = added + 1
  end
end
redis.call('HINCRBY', KEYS[4], 'enqueued', added)
return added
