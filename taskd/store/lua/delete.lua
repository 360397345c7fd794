-- Delete a job that is not running: its record and its id wherever it is.
-- KEYS[1] -> the job's hash
-- KEYS[2] -> the queue's inbox (its ready list)
-- KEYS[3] -> the queue's scheduled set
-- KEYS[4] -> the queue's completed set
-- KEYS[5] -> the queue's dead set
-- KEYS[6] -> the queue's cancelled set
-- KEYS[7] -> the queue's index
-- ARGV[1] -> job id
-- ARGV[2] -> the queue's limit key prefix
-- Returns the job's state before ('active': nothing changed), or 'missing'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'missing'
end
if state == 'active' then
  return state
end
if state == 'queued' then
  remove_queued(KEYS[2], ARGV[2], KEYS[1], ARGV[1])
end
for i = 3, 7 do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
redis.call('DEL', KEYS[1])
return state
