-- Retry a bounded batch of one queue's dead letters, each as retry.lua does (lib.lua,
-- retry_failed): those of one type, or all, that failed at or before NOW (when the bulk
-- retry began, so that a job failing again meanwhile is not retried twice), oldest first.
-- The store calls it again from where the last call stopped, until it says it is done;
-- Redis serves other commands between batches. Where it stopped is the last dead letter
-- it looked at and left in the set (another type's): a later batch starts after it, or,
-- should that one be gone meanwhile (deleted, retried by hand), at the first of its
-- failure time, looking again at what it left there.
-- KEYS[1] -> <prefix>:{<queue>}:dead, the failed set (keys.failed)
-- KEYS[2] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- ARGV[1..3] -> now, job hash prefix, limit key prefix (unused) (the header, lib.lua)
-- ARGV[4] -> most dead letters to look at, >= 1
-- ARGV[5] -> the job type to retry, or '' for every type
-- ARGV[6] -> where the last call stopped: the id it left, or '' to start from the oldest
-- ARGV[7] -> that id's score (when it failed, epoch ms), or ''
-- ARGV[8] -> <prefix>:{<queue>}:archive, the archive hand-off (lib.lua,
--   keep_for_archive)
-- Returns {retried, looked at, done (1: nothing that failed by NOW is left to look at),
-- where it stopped: the id (or '') and its score (or '')}.
local most = tonumber(ARGV[4])
local job_type = ARGV[5]
local after, after_score = ARGV[6], ARGV[7]
local start = 0
if after ~= '' then
  local rank = redis.call('ZRANK', KEYS[1], after)
  if rank then
    start = rank + 1
  else
    start = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. after_score)
  end
end
local entries = redis.call('ZRANGE', KEYS[1], start, start + most - 1, 'WITHSCORES')
local retried, looked = 0, 0
local done = #entries < 2 * most
for i = 1, #entries, 2 do
  local id, score = entries[i], entries[i + 1]
  if tonumber(score) > NOW then
    done = true
    break
  end
  looked = looked + 1
  local key = JOB .. id
  local f = redis.call('HMGET', key, 'state', 'type')
  if f[1] == 'failed' and (job_type == '' or f[2] == job_type) then
    redis.call('ZREM', KEYS[1], id)
    retry_failed(KEYS[2], key, id, ARGV[8])
    retried = retried + 1
  elseif not f[1] then
    redis.call('ZREM', KEYS[1], id) -- a stray: its record is gone
  else
    after, after_score = id, score
  end
end
return {retried, looked, done and 1 or 0, after, after_score}
