#!/usr/bin/env bash
# The project's run command (README "Run it"): installs the default model if needed, builds the
# engine in release mode and serves SmolLM2-135M-Instruct on http://127.0.0.1:8000 with the
# OpenAI-compatible API and the two-tier hotness-aware prefix cache, until Ctrl-C.
# Every flag and HOTPREFIX_* variable of `hotprefix-engine` works; extra arguments are passed
# through (e.g. --listen 0.0.0.0:8000 --policy lru --device-cache-tokens 8192).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
cargo build --release --locked -p hotprefix-engine
exec ./target/release/hotprefix-engine \
    --model "${HOTPREFIX_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}" "$@"
