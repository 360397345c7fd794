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
-- ARGV[5] -> most jobs to look at
-- ARGV[6] -> the rank to look from: the jobs before it are kept for the archive, as
--   earlier calls of this pass found (they stay, and must not hide the jobs after them)
-- Returns {deleted, kept, more}: the jobs deleted, the jobs kept for the archive, and 1 if
-- every job looked at was past its retention (the next may be too), else 0.
local limit, cutoff = tonumber(ARGV[5]), tonumber(ARGV[4])
local from = tonumber(ARGV[6])
local window = redis.call('ZRANGE', KEYS[1], from, from + limit - 1, 'WITHSCORES')
local ids = {}
for i = 1, #window, 2 do
  if tonumber(window[i + 1]) > cutoff then
    break
  end
  ids[#ids + 1] = window[i]
end
local more = (#ids == limit) and 1 or 0
local looked = #ids
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
return {#ids, looked - #ids, more}
