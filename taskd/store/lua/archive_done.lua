-- Remove entries a daemon wrote to the archive from a queue's hand-off (Store.take_archive),
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
-- ARGV[3..] -> entry, score pairs, as Store.take_archive took them
-- Returns how many entries were removed.
local entries = {}
for i = 3, #ARGV, 2 do
  entries[#entries + 1] = ARGV[i]
end
local scores = scores_of(KEYS[1], entries)
local done, kept = {}, {}
for n, entry in ipairs(entries) do
  if scores[n] == ARGV[2 + 2 * n] then
    done[#done + 1] = entry
  end
  if string.find(entry, '@', 1, true) then
    kept[#kept + 1] = entry
  end
end
call_chunked('ZREM', KEYS[1], done)
call_chunked('HDEL', KEYS[2], kept)
if ARGV[2] == '1' and redis.call('GET', KEYS[3]) == ARGV[1] then
  redis.call('DEL', KEYS[3])
end
return #done
