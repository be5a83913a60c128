-- Admit what fits now (AdmissionQueue.dispatch; core.py: dispatch). dispatching.lua holds
-- the step. ARGV: channels, now, lease_ttl_s, max_grants, the calling replica, expired
-- memory (s). Returns {{id, tenant, replica, engine, footprint}..., {expired id}...}.
local out = dispatch_now(ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6])
return out
