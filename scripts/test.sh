#!/usr/bin/env bash
# The project's test command (README "Run the tests"): installs what the tests need, then runs
# formatting, lints and the whole test suite. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Rust toolchain is the machine's own (rustup); rustfmt and clippy are its components.
if ! cargo fmt --version >/dev/null 2>&1; then
    rustup component add rustfmt
fi
if ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add clippy
fi
# The simulator's tests read the bundled Mooncake traces from ../shared/traces.
if [ ! -f ../shared/traces/mooncake_fast25_conversation_trace.jsonl ]; then
    echo "error: ../shared/traces is missing; check out the project beside its shared/ folder" >&2
    exit 1
fi

# The default model file, which the engine's tests read (idempotent, checksum verified).
bash scripts/fetch-model.sh
# redis-server, which the engine's publisher tests and the router's cluster tests start.
bash scripts/setup-redis.sh
# The official OpenAI Python client, pinned, in .venv (engine/tests/openai_client.rs uses it).
bash scripts/setup-python.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
