-- The replica that publishes the shared controllers' decisions (AdmissionQueue.leader;
-- core.py: leader). ARGV: channels, now. Of the replicas alive at now (alive until >= now),
-- the one whose unbroken run of beats started first, ties to the smallest id; false if none.
local now = tonumber(ARGV[2])
local best, best_since = nil, nil
for _, r in ipairs(redis.call('ZRANGEBYSCORE', K_ALIVE, ARGV[2], '+inf')) do
  local since = tonumber(redis.call('HGET', K_SINCE, r))
  if best == nil or since < best_since or (since == best_since and r < best) then
    best, best_since = r, since
  end
end
if best == nil then
  return false
end
return best
