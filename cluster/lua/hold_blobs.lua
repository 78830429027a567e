-- Hold a submission's blobs while it is checked and created: none of them may be deleted
-- meanwhile (a job deleted elsewhere that was their last user). Refused, holding nothing,
-- when one of them is being deleted now.
--
-- KEYS[2i-1]  blob hash          rayfarm:blob:{sha}   (for each blob i)
-- KEYS[2i]    blob refs zset     rayfarm:blob:{sha}:refs
-- ARGV[1]     the hold's member  hold:{token}
-- ARGV[2]     when the hold lapses (epoch seconds), should its holder never release it
--
-- Returns 0 when every blob is held, else the (1-based) number of a blob being deleted.
for i = 1, #KEYS / 2 do
  if redis.call('HGET', KEYS[2 * i - 1], 'state') == 'dying' then
    return i
  end
end
for i = 1, #KEYS / 2 do
  redis.call('ZADD', KEYS[2 * i], ARGV[2], ARGV[1])
end
return 0
