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
# NVRTC from PyPI, so the CUDA kernels' compile check runs here without CUDA
# (engine/tests/cuda.rs fails rather than skips when HOTPREFIX_REQUIRE_NVRTC is set).
NVRTC_LIB=$(bash scripts/setup-nvrtc.sh)
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HOTPREFIX_REQUIRE_NVRTC=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# Helm lint and template of the chart, kubernetes-validate --strict (Kubernetes 1.33) of the
# chart, the CRD and the operator's objects for the examples, the examples against the CRD.
bash scripts/check-manifests.sh
