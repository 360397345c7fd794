-- Remove entries a daemon wrote to the archive from a queue's hand-off (take_archive.lua),
-- with their kept copies, and, when it stops archiving, give up the queue's archive lock
-- so that another daemon takes over at once. An entry goes only if its score is still the
-- one taken: a job that ended again meanwhile (retried, then finished) is a new entry
-- under the same id, still to be archived.
-- KEYS[1] -> <prefix>:{<queue>}:archive, the hand-off
-- KEYS[2] -> <prefix>:{<queue>}:archive:kept
-- KEYS[3] -> <prefix>:{<queue>}:archive:lock
-- No ARGV header (lib.lua): it uses none of now, job prefix and limit prefix.
-- ARGV[1] -> this daemon's id
-- ARGV[2] -> 1: give up the lock if this daemon holds it; 0: keep it
-- ARGV[3..] -> entry, score pairs, as take_archive.lua answered them
-- Returns how many entries were removed.
local removed = 0
for i = 3, #ARGV, 2 do
  local entry = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], entry) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], entry)
    removed = removed + 1
  end
  if string.find(entry, '@', 1, true) then
    redis.call('HDEL', KEYS[2], entry)
  end
end
if ARGV[2] == '1' and redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
return removed
