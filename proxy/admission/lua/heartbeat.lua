-- This replica is alive until ARGV[3] (AdmissionQueue.heartbeat; core.py: heartbeat).
-- ARGV: channels, replica, alive until, now, ttl. A first beat, or one after the last
-- lapsed, starts the replica's unbroken run of beats (common.lua: may_reap).
-- Returns 1 when it was known alive, else 0.
local old = redis.call('ZSCORE', K_ALIVE, ARGV[2])
if not old or tonumber(old) < tonumber(ARGV[4]) then
  redis.call('HSET', K_SINCE, ARGV[2], ARGV[4])
end
redis.call('HSET', K_BEAT_TTL, ARGV[2], ARGV[5])
if not old or tonumber(old) < tonumber(ARGV[3]) then
  redis.call('ZADD', K_ALIVE, ARGV[3], ARGV[2])
end
if old then
  return 1
end
return 0
