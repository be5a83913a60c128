-- Reclaim lapsed leases, then a tenant's granted items (AdmissionQueue.in_flight).
-- ARGV: channels, now, tenant
reclaim(ARGV[2])
return tonumber(redis.call('HGET', K_INFLIGHT, ARGV[3]) or '0')
