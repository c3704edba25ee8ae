#!/usr/bin/env bash
# The test command (README "Quick start"): every test, on every backend.
# Needs PostgreSQL and Redis (scripts/services.sh starts them) — the
# PostgreSQL and Redis variants fail rather than skip when those are down.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
