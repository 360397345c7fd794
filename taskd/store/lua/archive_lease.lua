-- Take or renew a queue's archive lease, before the archiver reads the oldest entries of
-- the queue's hand-off (lib.lua, keep_for_archive; Store.take_archive). One daemon at a
-- time archives a queue: it holds the lease and renews it with every take, so that
-- daemons do not write the same entries over one another; should it die, the lease lapses
-- and another takes over. Entries stay in the hand-off until written (archive_done.lua),
-- so the janitor keeps their jobs (trim.lua) and no crash loses one.
--
-- The entries and their records are read outside of Lua, by plain commands: handing each
-- of a record's fields to Lua and back cost Redis several times what reading it does, and
-- one script reading a whole batch held every other client up for milliseconds. Reading
-- them is safe outside of a script: a job that leaves its final state first moves its
-- entry to a kept copy (keep_for_archive), and archive_done removes an entry only if it
-- still ends at the time taken.
-- KEYS[1] -> <prefix>:{<queue>}:archive:lock, the daemon archiving the queue
-- No ARGV header (lib.lua): it uses none of now, job prefix and limit prefix.
-- ARGV[1] -> this daemon's id
-- ARGV[2] -> the lease, ms
-- Returns 1 when this daemon holds the lease (now renewed), 0 when another daemon does.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
-- A full Redis (maxmemory, noeviction) refuses the SET: the entries are taken all the same,
-- unlocked. Writing them (and removing them, which frees memory) is what a full Redis
-- needs; another daemon may write the same ones meanwhile, which is harmless.
redis.pcall('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
