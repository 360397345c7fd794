-- Enqueue a new job: write its record, index it, and either push its id on the ready
-- list or, when it has a time to wait for, put it in the scheduled set.
-- KEYS[1] -> the job's hash
-- KEYS[2] -> the queue's ready list
-- KEYS[3] -> the queue's scheduled set
-- KEYS[4] -> the queue's index
-- KEYS[5] -> the queue's totals hash
-- ARGV[1] -> job id
-- ARGV[2] -> type
-- ARGV[3] -> queue
-- ARGV[4] -> payload, JSON text
-- ARGV[5] -> created_at, epoch ms
-- ARGV[6] -> max_attempts
-- ARGV[7] -> run_at, epoch ms, or 0 to run now
-- Returns 1, or 0 when a job with this id exists already (nothing is changed).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'type', ARGV[2], 'queue', ARGV[3],
  'payload', ARGV[4], 'attempts', 0, 'max_attempts', ARGV[6], 'created_at', ARGV[5])
if ARGV[7] ~= '0' then
  redis.call('HSET', KEYS[1], 'state', 'scheduled', 'run_at', ARGV[7])
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', 'queued')
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('HINCRBY', KEYS[5], 'enqueued', 1)
return 1
