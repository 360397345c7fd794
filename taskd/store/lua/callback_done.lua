-- End a callback a daemon had in flight: sent, failed for good (both counted in the
-- queue's totals), dropped (its job is gone), or returned to the front of the outbox for
-- any daemon to send (the daemon is stopping). Nothing happens if the id is no longer the
-- daemon's (a reaper returned it meanwhile: the daemon was taken for dead).
-- KEYS[1] -> <prefix>:{<queue>}:sending:<daemon>, the daemon's callbacks in flight
-- KEYS[2] -> <prefix>:{<queue>}:totals
-- KEYS[3] -> <prefix>:{<queue>}:callbacks, the outbox
-- No ARGV header (lib.lua): it uses none of now, job prefix and limit prefix.
-- ARGV[1] -> the job id
-- ARGV[2] -> 'sent', 'failed', 'dropped' or 'returned'
-- Returns 1 if the callback was the daemon's, else 0.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if ARGV[2] == 'returned' then
  redis.call('RPUSH', KEYS[3], ARGV[1])
elseif ARGV[2] ~= 'dropped' then
  redis.call('HINCRBY', KEYS[2], 'callbacks_' .. ARGV[2], 1)
end
return 1
