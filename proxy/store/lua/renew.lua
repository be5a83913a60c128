-- Extend leases of one tenant that are still held at now (Store.renew); never shortens one.
-- KEYS[1] leases zset   ARGV: now, lease_ttl_s, lease_id...   Returns how many were renewed.
local now = tonumber(ARGV[1])
local expiry = now + tonumber(ARGV[2])
local renewed = 0
for i = 3, #ARGV do
  local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if score and score > now then
    if expiry > score then
      redis.call('ZADD', KEYS[1], fmt(expiry), ARGV[i])
    end
    renewed = renewed + 1
  end
end
if renewed > 0 then
  keep(KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
end
return renewed
