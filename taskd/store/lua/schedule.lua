-- Remember the latest tick a schedule fired (or skipped), and the job it made; never go
-- back to an older tick, whichever daemon records last.
-- KEYS[1] -> <prefix>:{<queue>}:schedules
-- No ARGV header (lib.lua): it uses none of now, job prefix and limit prefix.
-- ARGV[1] -> the schedule's name
-- ARGV[2] -> the tick, epoch ms
-- ARGV[3] -> the job's id, or '' for a skipped tick
-- Returns 1 if recorded, 0 if a newer tick was recorded already.
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':tick'))
if current and current >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1] .. ':tick', ARGV[2], ARGV[1] .. ':job', ARGV[3])
return 1
