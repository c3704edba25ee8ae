#!/usr/bin/env bash
# Make sure the local PostgreSQL and Redis the tests use are running; start
# them (Debian packages, as on the CI machine) when they are not. Fails loudly
# when either cannot be reached: the PostgreSQL/Redis tests are never skipped.
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

wait_for() {
  local what=$1 check=$2
  for _ in $(seq 1 60); do
    if $check; then echo "$what is up"; return 0; fi
    sleep 0.5
  done
  echo "ERROR: $what did not come up" >&2
  return 1
}

if ! pg_up; then
  echo "starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
wait_for PostgreSQL pg_up

if ! redis_up; then
  echo "starting Redis"
  if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for Redis redis_up

# The browser end-to-end test (tests/it/browser.rs) drives Debian's Chromium
# through chromedriver; install both when either is missing.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "installing chromium and chromium-driver"
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# (Debian's launcher script may print a harmless /dev/shm size warning on stderr.)
/usr/bin/chromium --version 2>/dev/null
/usr/bin/chromedriver --version

# The playground's SSE parser has a Node test (node --test), run by the suite.
if ! command -v node >/dev/null; then
  echo "installing nodejs"
  apt-get update -qq && apt-get install -y -qq nodejs >/dev/null
fi
node --version

# The operations test (tests/it/ops.rs) runs Debian's Prometheus (scraping a
# confab) and promtool (the alert rules and their tests). The package's own
# service is not used: the test runs a private instance on a free port.
if [ ! -x /usr/bin/prometheus ] || [ ! -x /usr/bin/promtool ]; then
  echo "installing prometheus"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
/usr/bin/prometheus --version 2>&1 | head -n 1

# Real third-party LLM API servers the integration tests run as child
# processes (tests/it/support/peers.rs): llmock and the LiteLLM proxy, from
# PyPI, pinned (never litellm 1.107.x), in a venv kept outside the clone:
#   ${CONFAB_PEERS_DIR:-$HOME/.cache/confab-peers}/venv/bin/{llmock,litellm}
# The tests look there too (CONFAB_TEST_PEERS_DIR, then CONFAB_PEERS_DIR,
# then the default). A stamp records the installed pins, so a rerun is instant.
peers_dir=${CONFAB_TEST_PEERS_DIR:-${CONFAB_PEERS_DIR:-$HOME/.cache/confab-peers}}
peers_venv=$peers_dir/venv
peers_pins=(llmock==0.2.2 'litellm[proxy]==1.108.7')
peers_stamp=$peers_venv/.confab-pins
if [ "$(cat "$peers_stamp" 2>/dev/null)" != "${peers_pins[*]}" ] \
  || [ ! -x "$peers_venv/bin/llmock" ] || [ ! -x "$peers_venv/bin/litellm" ]; then
  echo "installing ${peers_pins[*]} into $peers_venv"
  started=$SECONDS
  rm -rf "$peers_venv"
  mkdir -p "$peers_dir"
  python3 -m venv "$peers_venv"
  if ! "$peers_venv/bin/pip" install -q "${peers_pins[@]}"; then
    echo "ERROR: pip install ${peers_pins[*]} failed" >&2
    exit 1
  fi
  echo "${peers_pins[*]}" >"$peers_stamp"
  echo "installed in $((SECONDS - started)) s"
fi
# The official OpenAI Python SDK, the client the OpenAI-compatible API is
# proven against (tests/it/openai_sdk.rs). LiteLLM already depends on it;
# pinned here so that the client under test never drifts.
openai_pin=3.57.0
if ! "$peers_venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_pin')" 2>/dev/null; then
  echo "installing openai==$openai_pin into $peers_venv"
  if ! "$peers_venv/bin/pip" install -q "openai==$openai_pin"; then
    echo "ERROR: pip install openai==$openai_pin failed" >&2
    exit 1
  fi
fi
# The contract checkers (tests/it/contract.rs): openapi-spec-validator
# validates GET /openapi.json as OpenAPI 3.1, schemathesis tests the
# running server against it. Pinned; checked and installed on their own
# like the SDK, so the stamp above stays as it is.
contract_pins=(schemathesis==4.32.5 openapi-spec-validator==0.9.0)
if ! "$peers_venv/bin/python" - "${contract_pins[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(name) != want for name, want in (p.split("==") for p in sys.argv[1:])))
PY
then
  echo "installing ${contract_pins[*]} into $peers_venv"
  if ! "$peers_venv/bin/pip" install -q "${contract_pins[@]}"; then
    echo "ERROR: pip install ${contract_pins[*]} failed" >&2
    exit 1
  fi
fi
"$peers_venv/bin/python" - <<'PY'
from importlib.metadata import version
print(f"llmock {version('llmock')}, litellm {version('litellm')}, openai {version('openai')}, "
      f"schemathesis {version('schemathesis')}, openapi-spec-validator {version('openapi-spec-validator')}")
PY
