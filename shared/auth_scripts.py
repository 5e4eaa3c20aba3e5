"""The Lua scripts that make a key's changes and a token's use atomic: a token can never carry
more rights than its key has at the moment it is used (the Redis layout: :mod:`shared.auth`)."""

AUDIT_MAX_ENTRIES = 10_000  # the audit stream is trimmed to about this many events

# Appends an audit event (the stream entry's ID is its time) unless no user is given.
AUDIT_LUA = f"""
local function audit(stream, user, host, action, pk, detail, call)
  if user == '' then return end
  (call or redis.call)('XADD', stream, 'MAXLEN', '~', {AUDIT_MAX_ENTRIES}, '*', 'action', action,
                       'public_key', pk, 'user', user, 'host', host, 'detail', detail)
end
local function note_expiry(key, stream, host, pk, expires)
  -- Noted once, if Redis takes writes: a full Redis (maxmemory) or a read-only one (a replica,
  -- as in a failover) refuses them, and the expired key's token still gets its 401, not a 503.
  if redis.call('HEXISTS', key, 'expiry_noted') == 0 and redis.pcall('HSETNX', key, 'expiry_noted', '1') == 1 then
    audit(stream, '-', host, 'expired', pk, 'expiry reached at ' .. expires, redis.pcall)
  end
end
"""

# Model names, as a JSON list (a key's or a token's ``scopes``): a table name → true.
SCOPES_LUA = """
local function scope_set(json)
  local set = {}
  for _, name in ipairs(cjson.decode(json)) do set[name] = true end
  return set
end
"""

# KEYS: key, token, key-tokens, audit. ARGV: pk, the stored hash the secret matched, token ttl,
# token digest, host, live tokens a key may have, token prefix, the scopes the client asked for (a
# JSON list; '' for the key's own).
# → {1, ttl, scopes granted} | {0} gone or secret rotated | {-1} expired | {-2, key's scopes} asked
#   for a model the key may not call
# Past the most live tokens a key may have, its oldest ends: one key holder could otherwise fill
# Redis with tokens (maxmemory, then every key's issuing fails) and make its revocation, which
# deletes them all in one script, stall Redis for seconds (200,000 tokens: 2 s).
# Times are Redis's (TIME), as in every script here: one clock for every replica, whatever its
# host's says (a replica 90 s slow let an expired key or an old secret past its grace mint tokens,
# and its tokens fell out of the index that --revoke-tokens and the per-key cap read).
ISSUE = (
    AUDIT_LUA
    + SCOPES_LUA
    + """
local k = redis.call('HMGET', KEYS[1], 'secret', 'old_secret', 'old_until', 'expires', 'scopes')
local t = redis.call('TIME')
local now = tonumber(t[1])
if not k[1] then return {0} end
local old = k[2] and k[2] == ARGV[2] and tonumber(k[3] or '0') > now
if k[1] ~= ARGV[2] and not old then return {0} end
local ttl = tonumber(ARGV[3])
if k[4] and k[4] ~= '' then
  local left = tonumber(k[4]) - now
  if left <= 0 then note_expiry(KEYS[1], KEYS[4], ARGV[5], ARGV[1], k[4]); return {-1} end
  if left < ttl then ttl = left end
end
local granted = k[5] or ''
if ARGV[8] ~= '' then
  if granted ~= '' then
    local allowed = scope_set(granted)
    for name in pairs(scope_set(ARGV[8])) do
      if not allowed[name] then return {-2, granted} end
    end
  end
  granted = ARGV[8]
  redis.call('HSET', KEYS[2], 'pk', ARGV[1], 'scopes', granted)
else
  redis.call('HSET', KEYS[2], 'pk', ARGV[1])
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
-- At most 1,000 a call: a key with more (made before the cap) loses them over its next issues.
local over = math.min(redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[6]) + 1, 1000)
if over > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[3], over)  -- digest, score, digest, score…
  for i = 1, #oldest, 2 do redis.call('DEL', ARGV[7] .. oldest[i]) end
end
-- Scored by the latest the token may live, its issue time + TOKEN_TTL (a key's expiry may end it
-- sooner: the authenticate script checks that), so the order of the scores is the order of issue;
-- the microseconds of Redis's clock order the tokens of one second. now is whole seconds, and
-- the token's clock starts inside this script: one second to spare.
local full = tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], now + full + 1 + tonumber(t[2]) / 1e6, ARGV[4])
if redis.call('TTL', KEYS[3]) < full + 1 then redis.call('EXPIRE', KEYS[3], full + 1) end
return {1, ttl, granted}
"""
)

# KEYS: token, audit. ARGV: prefix, model ('' = none), host, '1' to count the key's rate.
# → {0} invalid | {1, pk, scopes} forbidden | {2, pk, scopes, left[, limit, count, pttl]} ok
#   | {3, pk, scopes, left, limit, count, pttl} over the key's rate
# The scopes are the token's: its key's current ones, narrowed to those the token was issued for
# (a JSON list, '' for every model).
AUTHENTICATE = (
    AUDIT_LUA
    + SCOPES_LUA
    + """
local t = redis.call('HMGET', KEYS[1], 'pk', 'scopes')
if not t[1] then return {0} end
local now = tonumber(redis.call('TIME')[1])
local key = ARGV[1] .. 'key:' .. t[1]
local k = redis.call('HMGET', key, 'created', 'scopes', 'expires', 'rate')
if not k[1] then return {0} end
local exp = now + math.floor(redis.call('PTTL', KEYS[1]) / 1000)
if k[3] and k[3] ~= '' then
  if tonumber(k[3]) <= now then note_expiry(key, KEYS[2], ARGV[3], t[1], k[3]); return {0} end
  exp = math.min(exp, tonumber(k[3]))
end
local scopes = k[2] or ''
if t[2] and t[2] ~= '' then  -- a token issued for fewer models than its key may call
  local allowed = scopes ~= '' and scope_set(scopes)
  local kept = {}
  for _, name in ipairs(cjson.decode(t[2])) do
    if not allowed or allowed[name] then kept[#kept + 1] = cjson.encode(name) end
  end
  scopes = '[' .. table.concat(kept, ',') .. ']'  -- '[]' when the key has since lost them all
end
if ARGV[2] ~= '' and scopes ~= '' and not scope_set(scopes)[ARGV[2]] then return {1, t[1], scopes} end
if not k[4] or k[4] == '' or ARGV[4] ~= '1' then return {2, t[1], scopes, exp - now} end
local limit, window = string.match(k[4], '^(%d+)/(%d+)$')
local counter = ARGV[1] .. 'rate:' .. t[1]
local count = redis.call('INCR', counter)
local pttl = redis.call('PTTL', counter)
if pttl < 0 then
  pttl = tonumber(window) * 1000
  redis.call('PEXPIRE', counter, pttl)
end
local code = 2
if count > tonumber(limit) then code = 3 end
return {code, t[1], scopes, exp - now, tonumber(limit), count, pttl}
"""
)

# KEYS: key, key-tokens, rate counter, audit. ARGV: token prefix, user, host, pk, last-used hash.
# → number of tokens killed, or -1 for no such key
REVOKE = (
    AUDIT_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local hashes = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, h in ipairs(hashes) do redis.call('DEL', ARGV[1] .. h) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HDEL', ARGV[5], ARGV[4])
audit(KEYS[4], ARGV[2], ARGV[3], 'revoke', ARGV[4], #hashes .. ' live token(s) invalidated')
return #hashes
"""
)

# KEYS: failure counters. ARGV: window (seconds). One script, so a counter never lives without
# its expiry (a window that starts with the first failure; one that somehow has none gets one).
RECORD_FAILURE = """
for _, name in ipairs(KEYS) do
  redis.call('INCR', name)
  if redis.call('TTL', name) < 0 then redis.call('EXPIRE', name, ARGV[1]) end
end
"""
