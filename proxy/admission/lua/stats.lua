-- Queued items and grant counters of the backlogged tenants, and the fair-share ledger
-- (AdmissionQueue.stats). ARGV: channels.
-- Returns {granted_total, {tenant, queued, granted}..., counters, queued charges, floor}
-- (counters and charges as flat HGETALL lists, numbers as strings).
local out = {}
local depth = redis.call('HGETALL', K_DEPTH)
for i = 1, #depth, 2 do
  out[#out + 1] = {depth[i], depth[i + 1], redis.call('HGET', K_GRANTED, depth[i]) or '0'}
end
return {redis.call('HGET', K_GRANTED, '') or '0', out, redis.call('HGETALL', K_VC),
        redis.call('HGETALL', K_QCHARGE), fmt(floor())}
