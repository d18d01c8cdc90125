#!/usr/bin/env bash
# End-to-end HTTP benchmark: the same shared-prefix workload, same seed, against the real engine
# twice, once with --policy hotprefix (a small device cache plus a host tier) and once with
# --policy lru (the same device cache, no host tier), and a side-by-side table of what clients
# saw (hit ratio, TTFT, throughput) with hotprefix/lru ratios.
#
# The device cache is deliberately small: with the defaults, 3 running requests of 272 prompt
# and 8 output tokens fill 53 of its 64 blocks, so less than one idle 256-token prefix stays
# on the device and the 8 (uniformly popular) prefixes are evicted between uses; whether they
# come back from the host tier or are recomputed is what separates the two policies.
#
# The defaults take about 2.5 minutes of benchmarking (plus the build) on a 2-core CPU machine
# with SmolLM2-135M. Every knob is an environment variable (below): RATE=R switches to open-loop
# Poisson arrivals at R req/s instead of CONCURRENCY closed-loop clients, and extra arguments go
# to `hotprefix-bench load` unchanged.
#
# Output: out/bench-http/{hotprefix,lru}.{json,csv}, the engine logs, and table.md.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-out/bench-http}
DEVICE_TOKENS=${DEVICE_TOKENS:-1024}
HOST_TOKENS=${HOST_TOKENS:-16384}
BLOCK_SIZE=${BLOCK_SIZE:-16}
MAX_RUNNING=${MAX_RUNNING:-3}
MAX_BATCH_TOKENS=${MAX_BATCH_TOKENS:-512}
PREFIX_GROUPS=${PREFIX_GROUPS:-8}
PREFIX_TOKENS=${PREFIX_TOKENS:-256}
SUFFIX_TOKENS=${SUFFIX_TOKENS:-16}
REQUESTS=${REQUESTS:-64}
ZIPF=${ZIPF:-0}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-8}
CONCURRENCY=${CONCURRENCY:-3}
RATE=${RATE:-}
SEED=${SEED:-0}
DURATION_LIMIT=${DURATION_LIMIT:-150}
# Warm-up requests before each measured run, so that the first measured requests do not also
# pay for a freshly started engine (weights paged in, thread pools started).
WARMUP=${WARMUP:-2}

if [ "$MODEL" = models/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ ! -f "$MODEL" ]; then
    bash scripts/fetch-model.sh
fi
cargo build --release --locked -p hotprefix-engine -p hotprefix-sim
mkdir -p "$OUT"
if [ -n "$RATE" ]; then
    arrival=(--rate "$RATE")
else
    arrival=(--concurrency "$CONCURRENCY")
fi

engine_pid=
stop_engine() {
    if [ -n "$engine_pid" ] && kill -0 "$engine_pid" 2>/dev/null; then
        kill "$engine_pid" 2>/dev/null || true
        wait "$engine_pid" 2>/dev/null || true
    fi
    engine_pid=
}
trap stop_engine EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# run LABEL POLICY HOST_TOKENS: one engine, one load run, engine stopped.
run() {
    local label=$1 policy=$2 host=$3 port
    shift 3
    port=$(free_port)
    ./target/release/hotprefix-engine --model "$MODEL" --listen "127.0.0.1:$port" \
        --policy "$policy" --device-cache-tokens "$DEVICE_TOKENS" --host-cache-tokens "$host" \
        --block-size "$BLOCK_SIZE" --max-running "$MAX_RUNNING" \
        --max-batch-tokens "$MAX_BATCH_TOKENS" >"$OUT/$label.engine.log" 2>&1 &
    engine_pid=$!
    # Wait for /ready, but give up at once if the engine exits (a bad flag, a missing model).
    for _ in $(seq 600); do
        if ! kill -0 "$engine_pid" 2>/dev/null; then
            echo "error: the $label engine exited; see $OUT/$label.engine.log:" >&2
            tail -5 "$OUT/$label.engine.log" >&2
            exit 1
        fi
        if curl -sf "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then
            break
        fi
        sleep 0.2
    done
    echo "== $label: --policy $policy, device $DEVICE_TOKENS tokens, host $host tokens" >&2
    ./target/release/hotprefix-bench load --url "http://127.0.0.1:$port" --wait-ready 60 \
        --label "$label" --seed "$SEED" --groups "$PREFIX_GROUPS" --prefix-tokens "$PREFIX_TOKENS" \
        --suffix-tokens "$SUFFIX_TOKENS" --requests "$REQUESTS" --zipf "$ZIPF" \
        --output-tokens "$OUTPUT_TOKENS" "${arrival[@]}" \
        --duration-limit "$DURATION_LIMIT" --warmup "$WARMUP" --server-metrics \
        --json "$OUT/$label.json" --csv "$OUT/$label.csv" "$@" >&2
    stop_engine
}

extra=("$@")
started=$(date +%s)
run hotprefix hotprefix "$HOST_TOKENS" "${extra[@]}"
run lru lru 0 "${extra[@]}"
{
    echo "# hotprefix vs lru over HTTP ($(nproc) cores, $(basename "$MODEL"))"
    echo
    echo "Engine: device cache $DEVICE_TOKENS tokens (both), host tier $HOST_TOKENS tokens" \
        "(hotprefix only), block $BLOCK_SIZE, max running $MAX_RUNNING, max batch tokens" \
        "$MAX_BATCH_TOKENS. Ratio rows: latency below 1 and hit ratio or throughput above 1" \
        "favour hotprefix."
    echo
    ./target/release/hotprefix-bench load --compare "$OUT/hotprefix.json,$OUT/lru.json" \
        --baseline lru
} | tee "$OUT/table.md"
echo "total $(($(date +%s) - started)) s; wrote $OUT/table.md" >&2
