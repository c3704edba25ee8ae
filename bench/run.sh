#!/usr/bin/env bash
# confab's benchmark harness (BENCHMARKS.md explains the method).
#
#   bench/run.sh [scenario…] [--quick]
#
# Scenarios: post-chat db-ceiling list-chats get-chat sse-1k sse-burst sse-10k
# light-load gateway embedded footprint (default: all). --quick runs each for a few
# seconds at low concurrency: a smoke test (CI runs it), not numbers to
# compare; its gateway scenario skips LiteLLM (BENCH_GATEWAY_LITELLM=1 keeps it).
#
# Builds release, starts a dedicated Redis and confab (as deployed: API-key
# auth, PostgreSQL, Redis rate limiting raised so it never refuses, JSON logs
# at info to a file, metrics on) against a fresh PostgreSQL database, runs the
# scenarios, stops everything it started (also on failure or Ctrl-C), prints
# the tables and writes out/bench/<run>.json and out/bench/latest.json.
#
# Environment: BENCH_PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
# CARGO_TARGET_DIR (default ./target), BENCH_KEEP_LOGS=1 keeps the server logs,
# CONFAB_PEERS_DIR (default ~/.cache/confab-peers: the venv holding litellm),
# BENCH_GW_LEVELS ("100 1000") / BENCH_GW_PACES ("25 2") / BENCH_GATEWAY_LITELLM (1):
# the gateway scenario's concurrency levels, its upstream's delays before each
# token (ms; one upstream per pace) and whether LiteLLM runs (full size).
# BENCH_BASELINE_BIN / BENCH_BASELINE_LABEL / BENCH_BASELINE_ROUNDS (2): run
# sse-1k on an older binary too, in rounds alternating with the current one
# (same run; see below), BENCH_PERF=1: profile the server during sse-1k and the bursts,
# BENCH_SERVER_ENV: extra VAR=value words for every confab server (experiments,
# e.g. BENCH_SERVER_ENV=DB_GROUP_COMMIT=off).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ALL=(post-chat db-ceiling list-chats get-chat sse-1k sse-burst sse-10k light-load gateway embedded footprint)
QUICK=0
SELECTED=()
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *)
      if [[ " ${ALL[*]} " != *" $arg "* ]]; then
        echo "bench/run.sh: unknown scenario '$arg' (known: ${ALL[*]})" >&2
        exit 2
      fi
      SELECTED+=("$arg") ;;
  esac
done
[ ${#SELECTED[@]} -eq 0 ] && SELECTED=("${ALL[@]}")
want() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
want_any() { for s in "$@"; do want "$s" && return 0; done; return 1; }

# ---- parameters --------------------------------------------------------------
if [ $QUICK = 1 ]; then
  CLIENTS=8; DURATION=3; WARMUP=0.5; PGBENCH_DURATION=3
  SSE_CLIENTS=50; SSE_DURATION=3; BURSTS=(50 250)
  LONG_STREAMS=200; LONG_RAMP=1; LONG_MIN_WORDS=0; LONG_DELAY=100
  GW_LEVELS=(20); GW_DURATION=3; GW_LITELLM=${BENCH_GATEWAY_LITELLM:-0}
  LIGHT_DURATION=2
else
  CLIENTS=64; DURATION=20; WARMUP=3; PGBENCH_DURATION=20
  SSE_CLIENTS=1000; SSE_DURATION=20; BURSTS=(1000 5000)
  LONG_STREAMS=10000; LONG_RAMP=10; LONG_MIN_WORDS=300; LONG_DELAY=100
  read -r -a GW_LEVELS <<<"${BENCH_GW_LEVELS:-100 1000}"; GW_DURATION=20
  GW_LITELLM=${BENCH_GATEWAY_LITELLM:-1}
  LIGHT_DURATION=8
fi
# The gateway scenario's upstream: tokens per reply, delay before each (one
# upstream per pace: 25 ms is a real model's pace, at which the machine has
# CPU to spare and added latency shows; 2 ms is a fast upstream, at which a
# gateway's own cost bounds its streams/s).
GW_TOKENS=16
read -r -a GW_PACES <<<"${BENCH_GW_PACES:-25 2}"

# Thousands of sockets per process: raise the open-files limit for the
# server and the client (they inherit it). Containers may cap the hard limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
OPEN_FILES=$(ulimit -n)

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CONFAB=$TARGET_DIR/release/confab
BENCH=$TARGET_DIR/release/confab-bench
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/out/bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/confab-bench.XXXXXX")
FRAGMENTS=$WORK/results
mkdir -p "$OUT" "$FRAGMENTS"
PG_ADMIN=${BENCH_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PG_BASE=${PG_ADMIN%/*}
DB=confab_bench_$(date -u +%Y%m%d_%H%M%S)_$$
DB_URL=$PG_BASE/$DB
DB_CREATED=0
FRESH_DBS=()
SERVER_PID=
REDIS_PID=
UPSTREAM_PIDS=()
LITELLM_PID=
PEERS_DIR=${CONFAB_PEERS_DIR:-$HOME/.cache/confab-peers}
started=$(date +%s)
LOADAVG_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[bench %3ss] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

stop_pid() { # pid: SIGTERM, wait up to 20 s, then SIGKILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "pid $pid did not stop within 20 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$SERVER_PID" ]; then stop_pid "$SERVER_PID"; fi
  if [ -n "$LITELLM_PID" ]; then stop_pid "$LITELLM_PID"; fi
  for pid in "${UPSTREAM_PIDS[@]}"; do stop_pid "$pid"; done
  if [ -n "$REDIS_PID" ]; then stop_pid "$REDIS_PID"; fi
  for db in "${FRESH_DBS[@]}"; do
    psql "$PG_ADMIN" -qAt -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 \
      || log "could not drop database $db"
  done
  if [ $DB_CREATED = 1 ]; then
    psql "$PG_ADMIN" -qAt -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 \
      || log "could not drop database $DB"
  fi
  if [ $status -ne 0 ]; then
    for f in "$WORK"/*.stderr; do
      [ -s "$f" ] && { log "--- tail of $(basename "$f")"; tail -n 20 "$f" >&2; }
    done
    log "FAILED (exit $status); logs kept in $WORK"
  elif [ "${BENCH_KEEP_LOGS:-0}" = 1 ]; then
    log "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- build -------------------------------------------------------------------
# What was measured: the commit the binaries are built from, taken before the
# build. If HEAD moves while cargo runs (a commit on a shared checkout), the
# label says so instead of naming a commit that was not built.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
log "building release (confab, confab-bench)"
cargo build --release -p confab-server -p confab-bench --locked
build_done=$(date +%s)
head_after_build=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ "${commit%+dirty}" = "$head_after_build" ] \
  || commit="$commit (HEAD moved to $head_after_build during the build)"

# ---- services ----------------------------------------------------------------
if ! pg_isready -q -d "$PG_ADMIN" 2>/dev/null || ! redis-server --version >/dev/null 2>&1; then
  bash scripts/services.sh
fi

# A scenario that fails is reported and the run goes on; the exit status
# says whether any failed.
FAILED=()
run_scenario() { # name, command…
  local name=$1; shift
  if ! "$@"; then
    log "scenario $name FAILED"
    FAILED+=("$name")
  fi
}

# Before each measurement, PostgreSQL is brought to rest: a CHECKPOINT
# writes out now what the scenarios before left dirty in its buffers, and
# autovacuum workers they woke are waited out (at most BENCH_SETTLE_S, 30 s).
# Without it a scenario paid for its predecessors' work: on a slow machine
# the WAL of eight minutes of scenarios (sse-10k's flush rewrites 5,000
# replies' text every second) forced checkpoints whose writes landed in
# the rows after it, and the gateway row's p99 was 6-7 ms in the full run
# against 3.1 ms alone. A scenario's own checkpoints still count.
settle_db() {
  [ "$DB_CREATED" = 1 ] || return 0
  local t0=$EPOCHREALTIME busy
  if psql "$PG_ADMIN" -qAt -c "CHECKPOINT" >/dev/null 2>&1; then
    SETTLES=$((SETTLES + 1))
  else
    log "settle: CHECKPOINT failed"
  fi
  for _ in $(seq 1 "${BENCH_SETTLE_S:-30}"); do
    busy=$(psql "$PG_ADMIN" -qAt -c \
      "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'" 2>/dev/null) || busy=0
    [ "${busy:-0}" = 0 ] && break
    sleep 1
  done
  [ "${busy:-0}" = 0 ] || log "settle: $busy autovacuum worker(s) still running; going on"
  SETTLE_S=$(awk -v s="$SETTLE_S" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", s + b - a }')
}
SETTLE_S=0
SETTLES=0
# Checkpoints PostgreSQL started because WAL reached max_wal_size (or a
# CHECKPOINT command: the report subtracts settle_db's own).
checkpoints_requested() {
  psql "$PG_ADMIN" -qAt -c "SELECT num_requested FROM pg_stat_checkpointer" 2>/dev/null \
    || psql "$PG_ADMIN" -qAt -c "SELECT checkpoints_req FROM pg_stat_bgwriter" 2>/dev/null || echo 0
}
CHECKPOINTS_AT_START=$(checkpoints_requested)

# Fragments are numbered in the order the scenarios ran (the report keeps it).
seq_no=0
fragment() { # name (a server's footprint is settled before the server starts)
  [[ $1 == footprint-* ]] || settle_db
  seq_no=$((seq_no + 1)); FRAG=$(printf '%s/%02d-%s.json' "$FRAGMENTS" "$seq_no" "$1")
}

# Start confab serve with the given environment; sets SERVER_PID/SERVER_URL
# and records how long it took from exec to the first /health 200.
start_server() { # name, env assignments…
  local name=$1; shift
  local port dir
  port=$("$BENCH" free-port)
  dir=$WORK/$name
  mkdir -p "$dir"
  settle_db
  local t0=$EPOCHREALTIME
  # Its own directory: no stray .env is read, and SQLite's default file lands there.
  ( cd "$dir" && exec env -i PATH="$PATH" HOME="$dir" \
      HOST=127.0.0.1 PORT="$port" LOG_LEVEL=info LOG_FORMAT=json \
      RATE_LIMIT_BURST=1000000000 RATE_LIMIT_PER_SECOND=1000000000 \
      SHUTDOWN_GRACE_SECONDS=10 "$@" ${BENCH_SERVER_ENV:-} \
      "$CONFAB" serve >"$WORK/$name.log" 2>"$WORK/$name.stderr" ) &
  SERVER_PID=$!
  SERVER_URL=http://127.0.0.1:$port
  fragment "footprint-$name"
  "$BENCH" wait-ready --url "$SERVER_URL" --pid "$SERVER_PID" --started-at "$t0" \
    --scenario footprint --label "$name" --out "$FRAG"
}

# BENCH_PERF=1: sample the server's stacks with `perf record` (software
# clock, 499 Hz) while a scenario runs, then write the hottest symbols to
# out/bench/<run>-<scenario>.perf.txt (the profile summaries in BENCHMARKS.md).
PERF_PID=
profile_server() { # scenario, seconds
  [ "${BENCH_PERF:-0}" = 1 ] || return 0
  local data=$WORK/$1.perf.data
  perf record -e cpu-clock -F 499 -g -p "$SERVER_PID" -o "$data" -- sleep "$2" \
    >"$WORK/$1.perf.log" 2>&1 &
  PERF_PID=$!
  PERF_SCENARIO=$1
}
profile_report() {
  [ -n "$PERF_PID" ] || return 0
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=
  perf report -i "$WORK/$PERF_SCENARIO.perf.data" --stdio --no-children --sort symbol \
    --percent-limit 0.7 -g none 2>/dev/null | grep -v '^$' >"$OUT/$RUN_ID-$PERF_SCENARIO.perf.txt" || true
  log "profile: $OUT/$RUN_ID-$PERF_SCENARIO.perf.txt"
}

stop_server() {
  stop_pid "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

# The dedicated Redis: the machine's 6379 is shared with the tests.
start_redis() {
  local i
  REDIS_PORT=$("$BENCH" free-port)
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" --daemonize no &
  REDIS_PID=$!
  for i in $(seq 1 200); do
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "$REDIS_PID" 2>/dev/null || break
    sleep 0.05
  done
  log "Redis did not start"; return 1
}

# Which demo user an API key acts for: Alice writes (post-chat, streams), Bob reads.
create_key() { # user id
  DATABASE_URL=$DB_URL "$CONFAB" key create --user "$1" --name bench 2>/dev/null \
    | awk '$1 == "key:" { print $2 }'
}

ALICE=00000000-0000-0000-0001-000000000001
BOB=00000000-0000-0000-0001-000000000002
PROBE_PG=()
deployed_env=()

if want_any post-chat db-ceiling list-chats get-chat sse-1k sse-burst sse-10k light-load gateway footprint; then
  log "fresh database $DB and a dedicated Redis"
  psql "$PG_ADMIN" -qAt -c "CREATE DATABASE $DB" >/dev/null
  DB_CREATED=1
  DATABASE_URL=$DB_URL "$CONFAB" migrate >/dev/null
  DATABASE_URL=$DB_URL "$CONFAB" seed-demo >/dev/null
  ALICE_KEY=$(create_key $ALICE)
  BOB_KEY=$(create_key $BOB)
  [ -n "$ALICE_KEY" ] && [ -n "$BOB_KEY" ] || { log "could not create API keys"; exit 1; }
  start_redis
  deployed_env=(APP_ENV=production DATABASE_URL="$DB_URL" REDIS_URL="redis://127.0.0.1:$REDIS_PORT")
  PROBE_PG=(--redis-pid "$REDIS_PID" --db-name "$DB")
fi

# ---- confab on PostgreSQL + Redis, default model delays ------------------------
if want_any post-chat db-ceiling list-chats get-chat sse-1k sse-burst footprint; then
  log "confab (postgres, redis)"
  start_server postgres "${deployed_env[@]}"
  probe=(--server-pid "$SERVER_PID" "${PROBE_PG[@]}")

  if want post-chat; then
    fragment post-chat
    log "post-chat: $CLIENTS clients, ${DURATION}s (after ${WARMUP}s warm-up)"
    run_scenario post-chat env BENCH_API_KEY="$ALICE_KEY" "$BENCH" http --kind post-chat --url "$SERVER_URL" \
      --concurrency $CLIENTS --duration-s $DURATION --warmup-s $WARMUP "${probe[@]}" \
      --scenario post-chat --out "$FRAG"
  fi
  if want db-ceiling; then
    for script in db-ceiling db-ceiling-autocommit; do
      fragment "$script"
      log "$script: pgbench, $CLIENTS clients, ${PGBENCH_DURATION}s"
      run_scenario "$script" "$BENCH" pgbench --db-url "$DB_URL" --script "bench/sql/$script.sql" \
        --clients $CLIENTS --duration-s $PGBENCH_DURATION "${probe[@]}" \
        --scenario "$script" --out "$FRAG"
    done
  fi
  if want list-chats; then
    fragment list-chats
    log "list-chats: $CLIENTS clients, ${DURATION}s"
    run_scenario list-chats env BENCH_API_KEY="$BOB_KEY" "$BENCH" http --kind list-chats --url "$SERVER_URL" \
      --concurrency $CLIENTS --duration-s $DURATION --warmup-s $WARMUP --setup-chats 60 \
      "${probe[@]}" --scenario list-chats --out "$FRAG"
  fi
  if want get-chat; then
    fragment get-chat
    log "get-chat: $CLIENTS clients, ${DURATION}s"
    run_scenario get-chat env BENCH_API_KEY="$BOB_KEY" "$BENCH" http --kind get-chat --url "$SERVER_URL" \
      --concurrency $CLIENTS --duration-s $DURATION --warmup-s $WARMUP --setup-messages 20 \
      "${probe[@]}" --scenario get-chat --out "$FRAG"
  fi
  if want sse-1k; then
    fragment sse-1k
    log "sse-1k: $SSE_CLIENTS concurrent streams, ${SSE_DURATION}s"
    profile_server sse-1k $((SSE_DURATION + 2))
    run_scenario sse-1k env BENCH_API_KEY="$ALICE_KEY" "$BENCH" sse --shape loop --streams $SSE_CLIENTS \
      --duration-s $SSE_DURATION --spread-s 1 --token-delay 10-30 --url "$SERVER_URL" \
      "${probe[@]}" --scenario sse-1k --label "$SSE_CLIENTS clients" --out "$FRAG"
    profile_report
  fi
  if want sse-burst; then
    for n in "${BURSTS[@]}"; do
      fragment "sse-burst-$n"
      log "sse-burst: $n streams at once"
      profile_server "sse-burst-$n" 6
      run_scenario "sse-burst-$n" env BENCH_API_KEY="$ALICE_KEY" "$BENCH" sse --shape burst --streams "$n" --token-delay 10-30 \
        --url "$SERVER_URL" "${probe[@]}" --scenario sse-burst --label "$n" \
        --out "$FRAG"
      profile_report
      # The server's own view of the burst (cumulative over the bursts so far).
      curl -sf "$SERVER_URL/metrics" >"$OUT/$RUN_ID-sse-burst-$n.metrics.txt" || true
    done
  fi
  stop_server
fi

# Two variants measured in rounds, in the order A B, B A, A B, …: a drift of
# the machine's speed (seen: 1.5x within minutes) weighs on both alike.
abba() { # round, a, b → the two in that round's order
  if [ $(($1 % 2)) = 1 ]; then echo "$2 $3"; else echo "$3 $2"; fi
}

# ---- sse-1k on a baseline binary, same run (BENCH_BASELINE_BIN) ------------------
# BENCH_BASELINE_BIN=<an older confab binary> [BENCH_BASELINE_LABEL=<its commit>]:
# the same sse-1k, same client and Redis, on the current binary and on that
# binary, each on a fresh database of its own (migrated, seeded and keyed by
# that binary), one right after the other: the before/after ratio of CPU per
# token event within one run, like for like. (The sse-1k above runs on the
# database and process that served the scenarios before it.)
sse_1k_fresh() { # scenario, binary, label, round
  local name=$1 binary=$2 label=$3 round=$4 db key
  db=${DB}_${name//-/_}_$round
  FRESH_DBS+=("$db")
  psql "$PG_ADMIN" -qAt -c "CREATE DATABASE $db" >/dev/null
  DATABASE_URL=$PG_BASE/$db "$binary" migrate >/dev/null
  DATABASE_URL=$PG_BASE/$db "$binary" seed-demo >/dev/null
  key=$(DATABASE_URL=$PG_BASE/$db "$binary" key create --user $ALICE --name bench 2>/dev/null \
    | awk '$1 == "key:" { print $2 }')
  [ -n "$key" ] || { log "could not create an API key for $name"; exit 1; }
  local current=$CONFAB
  CONFAB=$binary
  start_server "$name-$round" APP_ENV=production DATABASE_URL="$PG_BASE/$db" REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
  CONFAB=$current
  fragment "$name-$round"
  log "$name (round $round): $SSE_CLIENTS concurrent streams, ${SSE_DURATION}s"
  profile_server "$name-$round" $((SSE_DURATION + 2))
  run_scenario "$name" env BENCH_API_KEY="$key" "$BENCH" sse --shape loop --streams $SSE_CLIENTS \
    --duration-s $SSE_DURATION --spread-s 1 --token-delay 10-30 --url "$SERVER_URL" \
    --server-pid "$SERVER_PID" --redis-pid "$REDIS_PID" --db-name "$db" \
    --scenario "$name" --label "$label (round $round)" --out "$FRAG"
  profile_report
  stop_server
}
# Two rounds in the order current, baseline, baseline, current (abba); the
# report gives each round's ratio and the pooled one (BENCH_BASELINE_ROUNDS=1:
# one pair only).
if want sse-1k && [ -n "${BENCH_BASELINE_BIN:-}" ]; then
  current_label=$(git rev-parse --short HEAD 2>/dev/null || echo current)
  rounds=${BENCH_BASELINE_ROUNDS:-2}
  [ $QUICK = 1 ] && rounds=1
  for round in $(seq 1 "$rounds"); do
    log "sse-1k on fresh databases, round $round of $rounds: the current binary and the baseline ($BENCH_BASELINE_BIN)"
    for which in $(abba "$round" current baseline); do
      if [ "$which" = current ]; then
        sse_1k_fresh sse-1k-current "$CONFAB" "$current_label" "$round"
      else
        sse_1k_fresh sse-1k-baseline "$BENCH_BASELINE_BIN" "${BENCH_BASELINE_LABEL:-baseline}" "$round"
      fi
    done
  done
fi

# ---- confab on PostgreSQL + Redis, long slow replies ----------------------------
if want sse-10k; then
  log "confab (postgres, redis; SIMULATED_MIN_WORDS=$LONG_MIN_WORDS, delay ${LONG_DELAY} ms)"
  start_server postgres-long-replies "${deployed_env[@]}" \
    SIMULATED_MIN_WORDS=$LONG_MIN_WORDS SIMULATED_TOKEN_DELAY_MS=$LONG_DELAY
  fragment sse-10k
  log "sse-10k: $LONG_STREAMS streams started over ${LONG_RAMP}s (open files: $OPEN_FILES)"
  run_scenario sse-10k env BENCH_API_KEY="$ALICE_KEY" "$BENCH" sse --shape ramp --streams $LONG_STREAMS \
    --spread-s $LONG_RAMP --token-delay $LONG_DELAY --min-words $LONG_MIN_WORDS \
    --url "$SERVER_URL" --server-pid "$SERVER_PID" "${PROBE_PG[@]}" \
    --scenario sse-10k --label "$LONG_STREAMS streams" --out "$FRAG"
  # The server's own view of the row (its time to each 503, by route), to
  # set beside the client's send → refusal times.
  curl -sf "$SERVER_URL/metrics" >"$OUT/$RUN_ID-sse-10k.metrics.txt" || true
  stop_server
fi

# ---- light load: one client, group commit on and off ---------------------------
# Group commit must not cost a lone turn anything (issue #15: ±1 ms). One
# client, one request at a time: POST /chat (a whole turn: begin, the model,
# the final write) and then one stream after another (time to first token,
# which waits for the begin's commit; replies paced at 2 ms a token so that
# many streams fit), on a server with DB_GROUP_COMMIT on and on one with it
# off, on the same database, in the order on, off, off, on.
if want light-load; then
  for round in 1 2; do
    for mode in $(abba "$round" on off); do
      start_server "light-load-$mode-$round" "${deployed_env[@]}" DB_GROUP_COMMIT=$mode \
        SIMULATED_TOKEN_DELAY_MS=2
      fragment "light-load-$mode-$round"
      log "light-load: group commit $mode (round $round), POST /chat, 1 client, ${LIGHT_DURATION}s"
      run_scenario light-load env BENCH_API_KEY="$ALICE_KEY" "$BENCH" http --kind post-chat --url "$SERVER_URL" \
        --concurrency 1 --duration-s $LIGHT_DURATION --warmup-s 1 --server-pid "$SERVER_PID" "${PROBE_PG[@]}" \
        --scenario light-load --label "group commit $mode (round $round)" --out "$FRAG"
      fragment "light-load-stream-$mode-$round"
      log "light-load: group commit $mode (round $round), streams, 1 client, ${LIGHT_DURATION}s"
      run_scenario light-load-stream env BENCH_API_KEY="$ALICE_KEY" "$BENCH" sse --shape loop --streams 1 \
        --duration-s $LIGHT_DURATION --spread-s 0 --token-delay 2 --url "$SERVER_URL" \
        --server-pid "$SERVER_PID" "${PROBE_PG[@]}" \
        --scenario light-load-stream --label "group commit $mode (round $round)" --out "$FRAG"
      stop_server
    done
  done
fi

# ---- gateway overhead: the upstream directly, confab, LiteLLM; same client -------
# One fast OpenAI-compatible upstream (confab-bench upstream: GW_TOKENS tokens,
# one every GW_DELAY_MS). The same closed-loop client streams from it
# directly, through confab (PostgreSQL + Redis as deployed, persistence, rate
# limits, token budgets and the ledger on) and through LiteLLM proxy
# (--num_workers 2), at each concurrency level in turn.
wait_http() { # url, seconds, [bearer key]
  local url=$1 limit=$2 key=${3:-} i
  for i in $(seq 1 $((limit * 10))); do
    if curl -sf -o /dev/null ${key:+-H "Authorization: Bearer $key"} "$url"; then return 0; fi
    sleep 0.1
  done
  log "no answer from $url within $limit s"; return 1
}

if want gateway; then
  declare -A UPSTREAM_V1 UPSTREAM_PID_OF
  for pace in "${GW_PACES[@]}"; do
    UP_PORT=$("$BENCH" free-port)
    "$BENCH" upstream --port "$UP_PORT" --tokens $GW_TOKENS --delay-ms "$pace" \
      >"$WORK/upstream-$pace.log" 2>&1 &
    UPSTREAM_PID_OF[$pace]=$!
    UPSTREAM_PIDS+=("$!")
    wait_http "http://127.0.0.1:$UP_PORT/v1/models" 10
    UPSTREAM_V1[$pace]=http://127.0.0.1:$UP_PORT/v1
  done
  LITELLM_URL=
  LITELLM_KEY=sk-confab-bench-litellm
  if [ "$GW_LITELLM" = 1 ]; then
    LITELLM_BIN=$PEERS_DIR/venv/bin/litellm
    [ -x "$LITELLM_BIN" ] || { log "LiteLLM is not installed at $LITELLM_BIN (scripts/services.sh installs it)"; exit 1; }
    LITELLM_PORT=$("$BENCH" free-port)
    mkdir -p "$WORK/litellm"
    {
      echo "model_list:"
      for pace in "${GW_PACES[@]}"; do
        printf '  - model_name: gw-%s\n    litellm_params:\n      model: openai/bench-upstream\n      api_base: %s\n      api_key: sk-upstream-unused\n' \
          "$pace" "${UPSTREAM_V1[$pace]}"
      done
    } >"$WORK/litellm/config.yaml"
    cat >>"$WORK/litellm/config.yaml" <<YAML
litellm_settings:
  num_retries: 0
general_settings:
  master_key: $LITELLM_KEY
YAML
    LITELLM_VERSION=$(find "$PEERS_DIR"/venv/lib -maxdepth 3 -name 'litellm-*.dist-info' 2>/dev/null \
      | sed -n 's/.*litellm-\([0-9.]*\)\.dist-info/\1/p' | head -n 1)
    log "LiteLLM proxy ${LITELLM_VERSION:-?} (--num_workers 2) in front of the upstream"
    # Its own directory and a clean environment; every lookup it would make
    # on the internet kept local (tests/it/support/peers.rs does the same).
    ( cd "$WORK/litellm" && exec env -i PATH="$(dirname "$LITELLM_BIN"):$PATH" HOME="$WORK/litellm" \
        LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
        HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost \
        LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True \
        LITELLM_LOCAL_BLOG_POSTS=True LITELLM_LOCAL_POLICY_TEMPLATES=True \
        LITELLM_LOCAL_AUTOROUTER_PRESETS=True LITELLM_DONT_SHOW_FEEDBACK_BOX=True \
        DISABLE_ADMIN_UI=True NO_DOCS=True \
        "$LITELLM_BIN" --config config.yaml --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 2 \
        >"$WORK/litellm.log" 2>&1 ) &
    LITELLM_PID=$!
    wait_http "http://127.0.0.1:$LITELLM_PORT/v1/models" 240 "$LITELLM_KEY"
    LITELLM_URL=http://127.0.0.1:$LITELLM_PORT
  else
    log "gateway: LiteLLM skipped in --quick (it takes 15-60 s to start; BENCH_GATEWAY_LITELLM=1 keeps it)"
  fi

  {
    echo "default = \"gw-${GW_PACES[0]}\""
    for pace in "${GW_PACES[@]}"; do
      printf '[[model]]\nname = "gw-%s"\nprovider = "openai"\nbase_url = "%s"\nupstream_model = "bench-upstream"\ncontext_tokens = 8192\nmax_output_tokens = 64\n' \
        "$pace" "${UPSTREAM_V1[$pace]}"
    done
  } >"$WORK/gateway-models.toml"
  # Token budgets on (a large daily limit: every turn reserves and settles).
  DATABASE_URL=$DB_URL "$CONFAB" org set-token-limit acme-corp --per-minute 0 --per-day 1000000000000 >/dev/null
  log "confab (postgres, redis) with model gw -> the upstream"
  start_server gateway "${deployed_env[@]}" MODELS_FILE="$WORK/gateway-models.toml"
  CONFAB_GW_PID=$SERVER_PID
  for pace in "${GW_PACES[@]}"; do
  UPSTREAM_PID=${UPSTREAM_PID_OF[$pace]}
  for c in "${GW_LEVELS[@]}"; do
    gw=(--duration-s $GW_DURATION --tokens $GW_TOKENS --pace-ms "$pace" --concurrency "$c" --scenario gateway)
    row="$c-at-${pace}ms"
    fragment "gateway-direct-$row"
    log "gateway: upstream directly, $c concurrent, $pace ms/token, ${GW_DURATION}s"
    run_scenario "gateway-direct-$row" "$BENCH" gateway --kind openai --url "${UPSTREAM_V1[$pace]%/v1}" \
      --model bench-upstream --server-pid "$UPSTREAM_PID" "${gw[@]}" --label "direct $c @${pace}ms" --out "$FRAG"
    fragment "gateway-confab-$row"
    log "gateway: through confab, $c concurrent, $pace ms/token, ${GW_DURATION}s"
    run_scenario "gateway-confab-$row" env BENCH_API_KEY="$ALICE_KEY" "$BENCH" gateway --kind confab \
      --url "$SERVER_URL" --model "gw-$pace" --server-pid "$CONFAB_GW_PID" --upstream-pid "$UPSTREAM_PID" \
      "${PROBE_PG[@]}" "${gw[@]}" --label "confab $c @${pace}ms" --out "$FRAG"
    # confab's own view of the row (TTFT since the request vs since the
    # upstream attempt, ...), cumulative over the server's rows so far.
    curl -sf "$SERVER_URL/metrics" >"$OUT/$RUN_ID-gateway-confab-$row.metrics.txt" || true
    if [ -n "$LITELLM_URL" ]; then
      fragment "gateway-litellm-$row"
      log "gateway: through LiteLLM, $c concurrent, $pace ms/token, ${GW_DURATION}s"
      run_scenario "gateway-litellm-$row" env BENCH_API_KEY="$LITELLM_KEY" "$BENCH" gateway --kind openai \
        --url "$LITELLM_URL" --model "gw-$pace" --server-pid "$LITELLM_PID" --server-tree \
        --upstream-pid "$UPSTREAM_PID" "${gw[@]}" --label "litellm $c @${pace}ms" --out "$FRAG"
    fi
  done
  done
  stop_server
  if [ -n "$LITELLM_PID" ]; then stop_pid "$LITELLM_PID"; LITELLM_PID=; fi
  for pid in "${UPSTREAM_PIDS[@]}"; do stop_pid "$pid"; done
  UPSTREAM_PIDS=()
fi

# ---- the embedded default: SQLite file, in-process limiter ----------------------
if want embedded; then
  log "confab (embedded: sqlite, in-process limiter)"
  start_server embedded
  fragment embedded
  log "embedded post-chat: $CLIENTS clients, ${DURATION}s"
  run_scenario embedded "$BENCH" http --kind post-chat --url "$SERVER_URL" --concurrency $CLIENTS \
    --duration-s $DURATION --warmup-s $WARMUP --server-pid "$SERVER_PID" \
    --scenario embedded --out "$FRAG"
  stop_server
fi

# ---- report ------------------------------------------------------------------
if [ "$DB_CREATED" = 1 ]; then
  log "PostgreSQL: $(( $(checkpoints_requested) - CHECKPOINTS_AT_START - SETTLES )) checkpoints forced by WAL volume during the run; $SETTLES settles between measurements took ${SETTLE_S} s in all"
fi
pg_version=$(psql "$PG_ADMIN" -qAt -c "SHOW server_version" 2>/dev/null || echo unknown)
redis_version=$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')
"$BENCH" report --dir "$FRAGMENTS" --json-out "$OUT/$RUN_ID.json" --latest "$OUT/latest.json" \
  --run-id "$RUN_ID" $([ $QUICK = 1 ] && echo --quick) \
  --meta "commit=$commit" --meta "postgresql=$pg_version" --meta "redis=$redis_version" \
  --meta "open_files=$OPEN_FILES" --meta "scenarios=${SELECTED[*]}" \
  --meta "loadavg_at_start=$LOADAVG_AT_START" --meta "failed=${FAILED[*]}" \
  --meta "seconds_after_build=$(( $(date +%s) - build_done ))" --meta "settle_seconds=$SETTLE_S"
log "wrote out/bench/$RUN_ID.json and out/bench/latest.json ($(( $(date +%s) - build_done )) s after the build)"
if [ ${#FAILED[@]} -gt 0 ]; then
  log "failed scenarios: ${FAILED[*]}"
  exit 1
fi
