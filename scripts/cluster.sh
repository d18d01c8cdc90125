#!/usr/bin/env bash
# The project's run command for a local cluster (README "Run it"): installs the default model if
# needed, builds the engine and the router in release mode, then starts on this machine
#   - a Redis server (the `redis-server` binary on a free loopback port, unless HOTPREFIX_REDIS_URL
#     names one already running),
#   - N engine replicas (HOTPREFIX_REPLICAS_N, default 2) serving SmolLM2-135M-Instruct on
#     127.0.0.1:8001.., publishing their hotness summaries to Redis, and
#   - the router on http://127.0.0.1:8080 (HOTPREFIX_ROUTER_LISTEN) with the `hotprefix` policy.
# Ctrl-C (or SIGTERM) stops everything cleanly. Extra arguments go to the router (e.g.
# --policy least-load). Engine flags can be set with HOTPREFIX_* variables (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${HOTPREFIX_REPLICAS_N:-2}"
MODEL="${HOTPREFIX_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
SERVICE="${HOTPREFIX_SERVICE:-local}"
ROUTER_LISTEN="${HOTPREFIX_ROUTER_LISTEN:-127.0.0.1:8080}"
FIRST_PORT="${HOTPREFIX_FIRST_ENGINE_PORT:-8001}"
if [[ "$MODEL" == models/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    bash scripts/fetch-model.sh
fi
cargo build --release --locked -p hotprefix-engine -p hotprefix-router
if [[ -z "${HOTPREFIX_REDIS_URL:-}" ]]; then
    bash scripts/setup-redis.sh
fi

pids=()
stop() {
    trap - INT TERM EXIT
    echo "stopping ${#pids[@]} processes" >&2
    # Routers and engines drain in-flight requests on SIGTERM.
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    [[ -n "${redis_dir:-}" ]] && rm -rf "$redis_dir"
}
trap stop INT TERM EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [[ -z "${HOTPREFIX_REDIS_URL:-}" ]]; then
    port="$(free_port)"
    redis_dir="$(mktemp -d)"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" \
        --loglevel warning &
    pids+=($!)
    export HOTPREFIX_REDIS_URL="redis://127.0.0.1:$port"
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    echo "redis on 127.0.0.1:$port" >&2
fi

for i in $(seq 0 $((N - 1))); do
    port=$((FIRST_PORT + i))
    ./target/release/hotprefix-engine --model "$MODEL" --listen "127.0.0.1:$port" \
        --service "$SERVICE" --replica-id "engine-$i" --advertise-url "http://127.0.0.1:$port" &
    pids+=($!)
done

./target/release/hotprefix-router --listen "$ROUTER_LISTEN" --service "$SERVICE" \
    --model "$MODEL" "$@" &
pids+=($!)
echo "router on http://$ROUTER_LISTEN ($N engine replicas); Ctrl-C stops everything" >&2
# Exit (and stop the rest) as soon as any process dies.
wait -n "${pids[@]}"
