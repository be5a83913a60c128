-- Extend leases still held at now, never shortening one (AdmissionQueue.renew).
-- ARGV: channels, now, lease_ttl_s, id...   Returns how many were still held.
local now = tonumber(ARGV[2])
local expiry = now + tonumber(ARGV[3])
local renewed = 0
for i = 4, #ARGV do
  local score = tonumber(redis.call('ZSCORE', K_LEASES, ARGV[i]))
  if score and score > now then
    if expiry > score then
      redis.call('ZADD', K_LEASES, fmt(expiry), ARGV[i])
    end
    renewed = renewed + 1
  end
end
return renewed
