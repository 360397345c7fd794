-- Delete a bounded batch of finished jobs older than their retention: their records and
-- their ids in the state's set and in the index. This keeps Redis memory bounded under
-- endless traffic.
-- KEYS[1] -> the queue's set of one final state, scored by finish time
-- KEYS[2] -> the queue's index
-- ARGV[1] -> jobs finished at or before this time, epoch ms, go
-- ARGV[2] -> most jobs to delete
-- ARGV[3] -> the queue's job hash prefix
-- Returns the number of jobs deleted.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[3] .. id)
end
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('ZREM', KEYS[2], unpack(ids))
end
return #ids
