-- Check and charge every limit of one request, all or nothing (Store.try_acquire).
-- KEYS[1] rpm bucket  KEYS[2] tpm bucket  KEYS[3] today's token counter
-- ARGV: now, tokens, rpm, tpm, daily_quota ("" = unlimited), next UTC midnight,
--       day counter ttl (s)
-- Returns {ok, reason, retry_after_s, rpm_tokens, tpm_tokens, used_today}; "" = none.
local now = tonumber(ARGV[1])
local tokens = arg_num(ARGV[2]) or 0
if tokens < 0 then
  tokens = 0
end
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local quota = tonumber(ARGV[5])
local midnight = tonumber(ARGV[6])

local rtok, rlast, ttok, tlast
if rpm then rtok, rlast = refill(KEYS[1], rpm, now) end
if tpm then ttok, tlast = refill(KEYS[2], tpm, now) end
local used = clamp(tonumber(redis.call('GET', KEYS[3]) or '0') or 0, 0, MAX_COUNTER)

local function reply(ok, reason, retry)
  return {ok, reason, fmt(retry), rtok and fmt(rtok) or '', ttok and fmt(ttok) or '', fmt(used)}
end

if tokens > MAX_CHARGE or (tpm and tokens > tpm) or (quota and tokens > quota) then
  return reply(0, 'too_large', math.huge)
end
if quota and used + tokens > quota then
  return reply(0, 'quota', midnight - now)
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
used = clamp(used + tokens, 0, MAX_COUNTER)
redis.call('SET', KEYS[3], fmt(used), 'EX', ARGV[7])
return reply(1, '', 0)
