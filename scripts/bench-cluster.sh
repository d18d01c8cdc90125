#!/usr/bin/env bash
# Real local cluster benchmark: Redis, 3 engine replicas of the default model and the router on
# this machine, the same shared-prefix workload (same seed) replayed through the router once per
# routing policy (hotprefix, round-robin, least-load), with fresh engines (empty caches) for
# each, and a side-by-side table of what clients saw (hit ratio from `cached_tokens`, TTFT,
# throughput) with ratios against round-robin.
#
# Each engine's device cache is deliberately small (1,024 tokens, no host tier): the workload's
# 6 prefixes of 256 tokens do not fit on one replica but do fit on three when each prefix stays
# on one replica, which is what prefix-aware routing is for. All processes share this machine's
# cores, so absolute latencies are those of an oversubscribed CPU; compare ratios.
#
# Every knob is an environment variable (below); extra arguments go to `hotprefix-bench load`.
# Output: out/bench-cluster/{hotprefix,round-robin,least-load}.{json,csv}, logs and table.md.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-out/bench-cluster}
REPLICAS=${REPLICAS:-3}
POLICIES=${POLICIES:-hotprefix round-robin least-load}
DEVICE_TOKENS=${DEVICE_TOKENS:-1024}
HOST_TOKENS=${HOST_TOKENS:-0}
MAX_RUNNING=${MAX_RUNNING:-3}
PREFIX_GROUPS=${PREFIX_GROUPS:-6}
PREFIX_TOKENS=${PREFIX_TOKENS:-256}
SUFFIX_TOKENS=${SUFFIX_TOKENS:-16}
REQUESTS=${REQUESTS:-72}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-8}
CONCURRENCY=${CONCURRENCY:-3}
SEED=${SEED:-0}
DURATION_LIMIT=${DURATION_LIMIT:-240}
WARMUP=${WARMUP:-0}

if [ "$MODEL" = models/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ ! -f "$MODEL" ]; then
    bash scripts/fetch-model.sh
fi
bash scripts/setup-redis.sh
cargo build --release --locked -p hotprefix-engine -p hotprefix-router -p hotprefix-sim
mkdir -p "$OUT"

pids=()
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap stop_all EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {
    local url=$1 pid=$2 log=$3
    for _ in $(seq 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: process for $url exited; see $log:" >&2
            tail -5 "$log" >&2
            exit 1
        fi
        if curl -sf "$url/ready" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    echo "error: $url not ready" >&2
    exit 1
}

# run POLICY: fresh Redis, engines and router; one load run; everything stopped.
run() {
    local policy=$1 rport router_port
    shift
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no \
        --loglevel warning >"$OUT/$policy.redis.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
    for i in $(seq 0 $((REPLICAS - 1))); do
        local port
        port=$(free_port)
        ./target/release/hotprefix-engine --model "$MODEL" --listen "127.0.0.1:$port" \
            --device-cache-tokens "$DEVICE_TOKENS" --host-cache-tokens "$HOST_TOKENS" \
            --max-running "$MAX_RUNNING" --threads 1 \
            --redis-url "redis://127.0.0.1:$rport" --service bench --replica-id "engine-$i" \
            >"$OUT/$policy.engine-$i.log" 2>&1 &
        pids+=($!)
        wait_ready "http://127.0.0.1:$port" "$!" "$OUT/$policy.engine-$i.log"
    done
    router_port=$(free_port)
    ./target/release/hotprefix-router --listen "127.0.0.1:$router_port" \
        --redis-url "redis://127.0.0.1:$rport" --service bench --model "$MODEL" \
        --policy "$policy" >"$OUT/$policy.router.log" 2>&1 &
    pids+=($!)
    # Ready once it has read every engine's registration.
    for _ in $(seq 100); do
        n=$(curl -sf "http://127.0.0.1:$router_port/health" 2>/dev/null |
            python3 -c 'import json,sys; print(sum(r["healthy"] for r in json.load(sys.stdin)["replicas"]))' 2>/dev/null || echo 0)
        [ "$n" = "$REPLICAS" ] && break
        sleep 0.2
    done
    echo "== $policy: $REPLICAS engines, device $DEVICE_TOKENS tokens, host $HOST_TOKENS tokens" >&2
    ./target/release/hotprefix-bench load --url "http://127.0.0.1:$router_port" --wait-ready 60 \
        --label "$policy" --seed "$SEED" --groups "$PREFIX_GROUPS" \
        --prefix-tokens "$PREFIX_TOKENS" --suffix-tokens "$SUFFIX_TOKENS" \
        --requests "$REQUESTS" --output-tokens "$OUTPUT_TOKENS" --concurrency "$CONCURRENCY" \
        --duration-limit "$DURATION_LIMIT" --warmup "$WARMUP" \
        --json "$OUT/$policy.json" --csv "$OUT/$policy.csv" "$@" >&2
    curl -sf "http://127.0.0.1:$router_port/metrics" >"$OUT/$policy.router-metrics.txt" || true
    stop_all
}

started=$(date +%s)
jsons=()
for policy in $POLICIES; do
    run "$policy" "$@"
    jsons+=("$OUT/$policy.json")
done
{
    echo "# Routing policies on a local cluster ($(nproc) cores, $REPLICAS x $(basename "$MODEL"))"
    echo
    echo "Engines: device cache $DEVICE_TOKENS tokens, host $HOST_TOKENS tokens, max running" \
        "$MAX_RUNNING, 1 compute thread each. Workload: $PREFIX_GROUPS prefixes of" \
        "$PREFIX_TOKENS tokens, $REQUESTS requests, $CONCURRENCY clients. Ratio rows are against" \
        "round-robin."
    echo
    ./target/release/hotprefix-bench load --compare "$(IFS=,; echo "${jsons[*]}")" \
        --baseline round-robin
} | tee "$OUT/table.md"
echo "total $(($(date +%s) - started)) s; wrote $OUT/table.md" >&2
