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
if [ "$status" -ne 0 ]; then
  # Each failure's panic message again: with RUST_BACKTRACE set, backtraces
  # can push them out of the part of a long log that gets read.
  echo "--- panics ---"
  grep -A4 "panicked at" "$log" | cut -c1-400 | head -n 100 || true
fi
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
