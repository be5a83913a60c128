-- Set tenants' concurrency limits (AdmissionQueue.set_limits; core.py: set_limits).
-- ARGV: channels, then (tenant, limit or '' for unlimited) pairs. Returns 1 when one changed.
local changed = false
for i = 2, #ARGV, 2 do
  local tenant, limit = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', K_LIMITS, tenant) or nil -- a missing field is false
  local want = nil
  if limit ~= '' then
    want = tostring(math.max(0, math.floor(tonumber(limit))))
  end
  if old ~= want then
    if want then
      redis.call('HSET', K_LIMITS, tenant, want)
    else
      redis.call('HDEL', K_LIMITS, tenant)
    end
    changed = true
    tenant_sync(tenant)
  end
end
if changed then
  redis.call('PUBLISH', CH_CAPACITY, 'limits')
  return 1
end
return 0
