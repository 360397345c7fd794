-- Record a running attempt's progress report, if the attempt is still this daemon's.
-- KEYS[1] -> <prefix>:{<queue>}:active:<daemon>, the daemon's active set
-- KEYS[2] -> <prefix>:{<queue>}:job:<id>, the job's hash
-- ARGV[1..3] -> now, then job hash prefix and limit key prefix (both unused) (the header,
--   lib.lua)
-- ARGV[4] -> job id
-- ARGV[5] -> attempt number
-- ARGV[6] -> progress value
-- ARGV[7] -> progress message
-- Returns 1 if recorded, 0 if the attempt is no longer this daemon's.
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) or redis.call('HGET', KEYS[2], 'attempts') ~= ARGV[5] then
  return 0
end
redis.call('HSET', KEYS[2], 'progress', ARGV[6], 'progress_message', ARGV[7], 'progress_at', NOW)
return 1
