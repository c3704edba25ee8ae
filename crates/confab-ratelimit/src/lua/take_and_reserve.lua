-- A turn's two admission steps in one atomic call: take one rate-limit token
-- from its org's bucket and, only if that was allowed, reserve its tokens in
-- every budget window. The bodies of token_bucket.lua (`bucket`) and
-- token_budget.lua (`budget`) are placed above this part as functions of
-- (KEYS, ARGV) when the script is built (src/redis_limiter.rs), so the rules
-- have one home each; this part only splits the keys and arguments between
-- them.
--
-- KEYS[1]   the bucket (as token_bucket.lua's KEYS[1])
-- KEYS[2…]  the budget windows (as token_budget.lua's KEYS)
-- ARGV[1…5] token_bucket.lua's ARGV with one cost: burst, rate, epsilon,
--           max TTL, 1
-- ARGV[6…]  token_budget.lua's ARGV for "reserve"
--
-- Returns the bucket's two strings (allowed, tokens left); when allowed,
-- followed by the budget's reply as decimal strings (a Lua number in a reply
-- would be truncated to an integer, which is what these are, but one type
-- of reply keeps the caller's parsing to one kind).

local took = bucket({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]})
local out = {took[1], took[2]}
if took[1] ~= '1' then
  return out
end

local windows, args = {}, {}
for i = 2, #KEYS do
  windows[#windows + 1] = KEYS[i]
end
for i = 6, #ARGV do
  args[#args + 1] = ARGV[i]
end
for _, v in ipairs(budget(windows, args)) do
  out[#out + 1] = string.format('%d', v)
end
return out
