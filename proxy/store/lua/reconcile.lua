-- Correct the TPM bucket and today's counter by actual - charged tokens (Store.reconcile),
-- and with a usage key count the request in it too (Store.finish: one round trip).
-- KEYS[1] tpm bucket  KEYS[2] today's token counter  KEYS[3] usage hash (optional)
-- ARGV: now, delta, tpm ("" = unlimited), day counter ttl (s); with KEYS[3]: then pairs of
-- usage field, increment
local now = tonumber(ARGV[1])
local delta = clamp(arg_num(ARGV[2]) or 0, -MAX_DELTA, MAX_DELTA)
local tpm = tonumber(ARGV[3])

if KEYS[3] then
  for i = 5, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end
if delta == 0 then
  return 1
end
if tpm then
  local tokens, last = refill(KEYS[1], tpm, now)
  tokens = tokens - delta
  if tokens > tpm then
    tokens = tpm
  end
  save(KEYS[1], tpm, tokens, last)
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
used = clamp(used + delta, 0, MAX_COUNTER)
redis.call('SET', KEYS[2], fmt(used), 'EX', ARGV[4])
return 1
