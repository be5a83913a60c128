-- Correct the TPM bucket and today's counter by actual - charged tokens (Store.reconcile).
-- KEYS[1] tpm bucket  KEYS[2] today's token counter
-- ARGV: now, delta, tpm ("" = unlimited), day counter ttl (s)
local now = tonumber(ARGV[1])
local delta = clamp(arg_num(ARGV[2]) or 0, -MAX_DELTA, MAX_DELTA)
local tpm = tonumber(ARGV[3])

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
