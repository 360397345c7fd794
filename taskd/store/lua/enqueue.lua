-- Enqueue new jobs of one queue: write each record, index it, and either make it ready
-- (lib.lua) or, when it has a time to wait for, put it in the scheduled set. A job
-- with an idempotency key that a live job of the queue already holds is not added: the
-- holder's id is answered instead, so a client's retried submission never duplicates a
-- job, even when the two submissions race through two daemons. One call takes a bounded
-- batch (the store sends at most ENQUEUE_CHUNK jobs per call).
-- KEYS[1] -> <prefix>:{<queue>}:ready, the inbox (keys.inbox)
-- KEYS[2] -> <prefix>:{<queue>}:scheduled
-- KEYS[3] -> <prefix>:{<queue>}:index, the sorted set index (layouts 1 and 2)
-- KEYS[4] -> <prefix>:{<queue>}:totals
-- KEYS[5] -> <prefix>:{<queue>}:arrivals, jobs added per 10-second bucket
-- KEYS[6] -> <prefix>:{<queue>}:pages, the paged index's directory (layout 3, index.lua)
-- ARGV[1..3] -> now (the newest created_at of the call's jobs), job hash prefix, limit key
--   prefix (unused) (the header, lib.lua)
-- ARGV[4] -> the record layout to write (record.RECORD_VERSION): 1 writes id and queue
--   in each record, for daemons that read them there; 1 and 2 index in the sorted set,
--   3 in pages
-- ARGV[5] -> the queue's name
-- ARGV[6] -> <prefix>:{<queue>}:idem:, the idempotency key prefix
-- ARGV[7] -> how long an idempotency key holds, ms
-- ARGV[8] -> the current arrivals bucket (record.BUCKET_MS)
-- ARGV[9..] -> 11 entries per job (record.NEW_JOB): id, type, payload (JSON text),
--   max_attempts, run_at (epoch ms, or 0 to run now), idempotency key (or ''), callback
--   URL (or ''), priority (0 to 9), created_at (epoch ms: each job its own, as the store
--   gathers jobs submitted at different moments into one call), trace context (or ''),
--   the id's 16 bytes
-- Returns, per job in order, the id of the job that holds it: its own id, or the id of
-- the earlier job with the same idempotency key, while that job is stored.
local holders = {}
local added = 0
local seen = {}
local layout = tonumber(ARGV[4])
-- Ids per ready list, the scheduled set's score, id pairs, and the new ids (with their
-- bytes) for the index: written once per call after the loop, in the order the jobs came.
local ready, lists = {}, {}
local scheduled, indexed, raw = {}, {}, {}
for i = 9, #ARGV, 11 do
  -- NEW_JOB's entries, in order.
  local id, job_type, payload, max_attempts, run_at, dedup, callback_url, priority,
    created_at, trace, id_raw = unpack(ARGV, i, i + 10)
  local holder = false
  if dedup ~= '' then
    holder = redis.call('GET', ARGV[6] .. dedup)
    -- A key whose job is gone (deleted, or past its retention) holds nothing any more.
    if holder and redis.call('EXISTS', JOB .. holder) == 0 then
      holder = false
    end
  end
  if holder then
    holders[#holders + 1] = holder
  else
    holders[#holders + 1] = id
    local key = JOB .. id
    if redis.call('EXISTS', key) == 0 then
      -- No attempts (0) and no priority at its default: an absent field reads as those,
      -- and each field costs some 72 bytes of Redis memory in a hash too big for a
      -- listpack (record.JOB_FIELDS).
      local fields = {'type', job_type, 'payload', payload, 'max_attempts', max_attempts,
        'created_at', created_at}
      if layout == 1 then
        for _, v in ipairs({'id', id, 'queue', ARGV[5]}) do
          fields[#fields + 1] = v
        end
      end
      if tonumber(priority) ~= DEFAULT_PRIORITY then
        fields[#fields + 1] = 'priority'
        fields[#fields + 1] = priority
      end
      if callback_url ~= '' then
        fields[#fields + 1] = 'callback_url'
        fields[#fields + 1] = callback_url
      end
      if trace ~= '' then
        fields[#fields + 1] = 'trace'
        fields[#fields + 1] = trace
      end
      if dedup ~= '' then
        redis.call('SET', ARGV[6] .. dedup, id, 'PX', ARGV[7])
        fields[#fields + 1] = 'idempotency_key'
        fields[#fields + 1] = dedup
      end
      if run_at ~= '0' then
        for _, v in ipairs({'state', 'scheduled', 'run_at', run_at}) do
          fields[#fields + 1] = v
        end
        scheduled[#scheduled + 1] = run_at
        scheduled[#scheduled + 1] = id
      else
        fields[#fields + 1] = 'state'
        fields[#fields + 1] = 'queued'
        local list = ready_list_for(KEYS[1], priority, seen)
        if not ready[list] then
          ready[list] = {}
          lists[#lists + 1] = list
        end
        ready[list][#ready[list] + 1] = id
      end
      redis.call('HSET', key, unpack(fields))
      indexed[#indexed + 1] = id
      raw[#raw + 1] = id_raw
      added = added + 1
    end
  end
end
for _, list in ipairs(lists) do
  call_chunked('LPUSH', list, ready[list])
end
call_chunked('ZADD', KEYS[2], scheduled)
if layout >= 3 then
  index_add(KEYS[6], indexed, raw)
else
  local scored = {}
  for _, id in ipairs(indexed) do
    scored[#scored + 1] = 0
    scored[#scored + 1] = id
  end
  call_chunked('ZADD', KEYS[3], scored)
end
redis.call('HINCRBY', KEYS[4], 'enqueued', added)
if added > 0 then
  redis.call('HINCRBY', KEYS[5], ARGV[8], added)
end
return holders
