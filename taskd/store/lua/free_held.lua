-- Let the held jobs of job types that no longer have a global_concurrency go back to the
-- front of the ready jobs, best first: with no limit, no job of the type ends holding a
-- slot, so nothing else would ever free them. The janitor calls it, for the types its
-- daemon has no global_concurrency for; jobs older daemons held in a plain list go too.
-- KEYS[1] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- ARGV[1..3] -> now (unused), job hash prefix, limit key prefix (the header, lib.lua)
-- ARGV[4] -> most jobs to free per type
-- ARGV[5..] -> the job types
-- Returns how many jobs it freed.
local most = tonumber(ARGV[4])
local freed = 0
for i = 5, #ARGV do
  local base = LIMIT .. ARGV[i]
  freed = freed + free_held(KEYS[1], base, most)
  for _, id in ipairs(redis.call('RPOP', base .. ':held', most) or {}) do
    redis.call('HDEL', JOB .. id, 'waiting_for')
    make_ready(KEYS[1], JOB .. id, id, true)
    freed = freed + 1
  end
end
return freed
