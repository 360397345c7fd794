-- Delete a bounded batch of finished jobs older than their retention: their records and
-- their ids in the state's set and in the index. This keeps Redis memory bounded under
-- endless traffic.
-- KEYS[1] -> <prefix>:{<queue>}:completed, :dead or :cancelled, the set of one final
--   state, scored by finish time
-- KEYS[2] -> <prefix>:{<queue>}:index, the sorted set index (keys.index)
-- KEYS[3] -> <prefix>:{<queue>}:archive, the archive hand-off: a job still in it is kept
--   until it is archived, whether or not this daemon archives
-- KEYS[4] -> <prefix>:{<queue>}:pages, the paged index's directory (index.lua)
-- ARGV[1..3] -> now (unused), job hash prefix, limit key prefix (unused) (the header,
--   lib.lua)
-- ARGV[4] -> jobs finished at or before this time, epoch ms, go
-- ARGV[5] -> most jobs to delete
-- Returns the number of jobs deleted.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[5]))
if #ids > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  local pending = scores_of(KEYS[3], ids)
  local archived = {}
  for i, id in ipairs(ids) do
    if not pending[i] then
      archived[#archived + 1] = id
    end
  end
  ids = archived
end
for _, id in ipairs(ids) do
  redis.call('DEL', JOB .. id)
end
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  unindex(KEYS[2], KEYS[4], ids)
end
return #ids
