-- Enqueue a new job: write its record and push its id on the queue's ready list.
-- KEYS[1] -> the job's hash
-- KEYS[2] -> the queue's ready list
-- ARGV[1] -> job id
-- ARGV[2] -> type
-- ARGV[3] -> queue
-- ARGV[4] -> payload, JSON text
-- ARGV[5] -> created_at, epoch ms
-- Returns 1, or 0 when a job with this id exists already (nothing is changed).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'type', ARGV[2], 'queue', ARGV[3],
  'payload', ARGV[4], 'state', 'queued', 'attempts', 0, 'created_at', ARGV[5])
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
