#!/usr/bin/env bash
# The simulator replay (README "Simulate"): builds the simulator in release mode and replays
# the bundled Mooncake conversation trace through every policy, printing the comparison table.
# Extra arguments are passed to `hotprefix-bench sim` (e.g. --replicas 4 --time-scale 1.2).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p hotprefix-sim
exec ./target/release/hotprefix-bench sim \
    --trace ../shared/traces/mooncake_fast25_conversation_trace.jsonl \
    --time-scale 0.3 --out out/sim "$@"
