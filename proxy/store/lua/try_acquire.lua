-- Check and charge every limit of one request, all or nothing (Store.try_acquire).
-- KEYS[1] rpm bucket  KEYS[2] tpm bucket  KEYS[3] leases zset (lease_id -> expiry)
-- KEYS[4] today's token counter
-- ARGV: now, lease_id, tokens, rpm, tpm, max_concurrency, daily_quota ("" = unlimited),
--       lease_ttl_s, next UTC midnight, day counter ttl (s)
-- Returns {ok, reason, retry_after_s, rpm_tokens, tpm_tokens, used_today}; "" = none.
local now = tonumber(ARGV[1])
local lease_id = ARGV[2]
local tokens = tonumber(ARGV[3])
local rpm = tonumber(ARGV[4])
local tpm = tonumber(ARGV[5])
local max_conc = tonumber(ARGV[6])
local quota = tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local midnight = tonumber(ARGV[9])

redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
local rtok, rlast, ttok, tlast
if rpm then rtok, rlast = refill(KEYS[1], rpm, now) end
if tpm then ttok, tlast = refill(KEYS[2], tpm, now) end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')

local function reply(ok, reason, retry)
  return {ok, reason, fmt(retry), rtok and fmt(rtok) or '', ttok and fmt(ttok) or '', fmt(used)}
end

if redis.call('ZSCORE', KEYS[3], lease_id) then
  return reply(1, '', 0)
end
if (tpm and tokens > tpm) or (quota and tokens > quota) then
  return reply(0, 'too_large', math.huge)
end
if quota and used + tokens > quota then
  return reply(0, 'quota', midnight - now)
end
if max_conc and redis.call('ZCARD', KEYS[3]) >= max_conc then
  return reply(0, 'concurrency', 0)
end
if rpm and rtok < 1 then
  return reply(0, 'rpm', (1 - rtok) * 60 / rpm)
end
if tpm and ttok < tokens then
  return reply(0, 'tpm', (tokens - ttok) * 60 / tpm)
end

if rpm then
  rtok = rtok - 1
  save(KEYS[1], rpm, rtok, rlast)
end
if tpm then
  ttok = ttok - tokens
  save(KEYS[2], tpm, ttok, tlast)
end
used = used + tokens
redis.call('SET', KEYS[4], fmt(used), 'EX', ARGV[10])
redis.call('ZADD', KEYS[3], fmt(now + ttl), lease_id)
keep(KEYS[3], math.ceil(ttl) + 60)
return reply(1, '', 0)
