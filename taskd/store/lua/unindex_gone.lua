-- Take out of a queue's index the ids whose record is gone: a listing found them there
-- (Inspector, Page.gone). A daemon of a taskd before the paged index deletes jobs without
-- taking their ids out of the pages; nothing else would. An id whose record exists stays.
-- KEYS[1] -> <prefix>:{<queue>}:index, the sorted set index (keys.index)
-- KEYS[2] -> <prefix>:{<queue>}:pages, the paged index's directory (index.lua)
-- ARGV[1..3] -> now (unused), job hash prefix, limit key prefix (unused) (the header,
--   lib.lua)
-- ARGV[4..] -> the ids
-- Returns how many ids it took out.
local gone = {}
for i = 4, #ARGV do
  if redis.call('EXISTS', JOB .. ARGV[i]) == 0 then
    gone[#gone + 1] = ARGV[i]
  end
end
unindex(KEYS[1], KEYS[2], gone)
return #gone
