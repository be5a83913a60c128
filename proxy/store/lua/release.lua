-- Free a lease and tell every replica (Store.release). Returns 1 when it was held.
-- KEYS[1] leases zset   ARGV: lease_id, channel, tenant
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
