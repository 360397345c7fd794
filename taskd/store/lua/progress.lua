-- Record a running attempt's progress report, if the attempt is still this daemon's.
-- KEYS[1] -> the daemon's active set for the job's queue
-- KEYS[2] -> the job's hash
-- ARGV[1] -> job id
-- ARGV[2] -> attempt number
-- ARGV[3] -> progress value
-- ARGV[4] -> progress message
-- ARGV[5] -> now, epoch ms
-- Returns 1 if recorded, 0 if the attempt is no longer this daemon's.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('HGET', KEYS[2], 'attempts') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], 'progress', ARGV[3], 'progress_message', ARGV[4], 'progress_at', ARGV[5])
return 1
