#!/usr/bin/env bash
# The test command (README "Quick start"): every test, on every backend.
# Starts the local PostgreSQL and Redis (and installs Chromium for the browser
# test) when they are missing: the PostgreSQL, Redis and browser variants fail
# rather than skip when those are unavailable.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
