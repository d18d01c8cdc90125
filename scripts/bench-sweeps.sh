#!/usr/bin/env bash
# Reproduces the simulator tables and plots of docs/benchmarks.md into out/sweeps/.
# Every grid: all four policies plus the offline bound, host capacity 4x device, 3 replays per
# point with arrivals jittered within 1 s (seeds 0, 1, 2), Llama-3.1-8B on H100 unless stated.
# The cache-policy grids route with least-load on the replicas' exact queues
# (--load-interval-ms 0), as the simulator did before it ran the router's policies; the routing
# comparison at the end uses the engines' publishing intervals.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p hotprefix-sim
bench=./target/release/hotprefix-bench
conv=../shared/traces/mooncake_fast25_conversation_trace.jsonl
syn=../shared/traces/mooncake_fast25_synthetic_trace.jsonl
common=(--repeats 3 --jitter 1 --quiet)
live=(--load-interval-ms 0)

sweep() { # name trace replicas device-tokens time-scales [extra args]
    local name=$1 trace=$2 replicas=$3 devices=$4 scales=$5
    shift 5
    echo "== $name" >&2
    "$bench" sweep --trace "$trace" --replicas "$replicas" --router least-load \
        --device-tokens "$devices" --host-ratio 4 --time-scale "$scales" \
        --out "out/sweeps/$name" "${common[@]}" "${live[@]}" "$@" > "out/sweeps/$name.md"
}
mkdir -p out/sweeps
sweep conversation-1 "$conv" 1 160000,320000,426788,1000000 0.1,0.2,0.3,0.35
sweep conversation-4 "$conv" 4 160000,320000,426788,1000000 0.4,0.8,1.2,1.4
sweep synthetic-1 "$syn" 1 200000,320000,426788,1000000 0.1,0.2,0.25,0.3
sweep synthetic-4 "$syn" 4 200000,320000,426788,1000000 0.4,0.8,1.0,1.2
# Generated workloads (default generator parameters, seed 0): a check outside the two traces.
sweep zipf-sessions-1 gen:zipf-sessions 1 100000,200000,426788 1,2,4
sweep shared-prefix-1 gen:shared-prefix 1 100000,200000,426788 1,2,4
# Ablations at one loaded point each.
sweep conversation-1-no-overlap "$conv" 1 426788 0.3 --no-overlap
sweep synthetic-1-qwen-h200 "$syn" 1 1000000 0.3 --model qwen2.5-7b --gpu h200
sweep synthetic-4-write-through "$syn" 4 426788 1.0 --policy hotprefix --write-through 4
sweep shared-prefix-1-write-through gen:shared-prefix 1 426788 1 --policy hotprefix --write-through 4
sweep synthetic-4-promotion "$syn" 4 426788 1.0 --policy hotprefix --promotion-budget 2147483648
sweep synthetic-4-promotion-displace "$syn" 4 426788 1.0 --policy hotprefix --promotion-budget 2147483648 --promotion-margin 1
echo "results in out/sweeps/" >&2
# Hotness clock sensitivity: wall clock (600 s) against the churn clock at several half-lives.
{
    echo "| trace, point | clock | hit | TTFT mean (s) | TTFT p99 (s) |"
    echo "|:--|:--|--:|--:|--:|"
    for point in "synthetic-1 $syn 1 200000 0.2" "synthetic-1 $syn 1 1000000 0.2" \
                 "conversation-1 $conv 1 426788 0.3" "synthetic-4 $syn 4 426788 1.0"; do
        set -- $point
        for clock in "--half-life-turnovers 0 --half-life 600" "--half-life-turnovers 0.5" \
                     "--half-life-turnovers 1" "--half-life-turnovers 2" "--half-life-turnovers 4" \
                     "--half-life-turnovers 8"; do
            # shellcheck disable=SC2086
            "$bench" sim --trace "$2" --replicas "$3" --router least-load --device-tokens "$4" \
                --host-tokens $(($4 * 4)) --time-scale "$5" --policy hotprefix "${common[@]}" \
                "${live[@]}" $clock |
                awk -F'|' -v p="$1 $4 x$5" -v c="$clock" '/^\| hotprefix/ {
                    printf "| %s | %s | %s | %s | %s |\n", p, c, $8, $11, $13 }'
        done
    done
} > out/sweeps/ablation-hotness-clock.md
# Cluster routing (docs/benchmarks.md, "Cluster routing (simulator)"): every routing policy and
# the shared-cache bound, cache policies hotprefix and lru, 4 and 8 replicas at two loads each
# (the same load per replica), summaries every 1 s and load reports every 250 ms of simulated
# time (the engines' defaults).
for point in "4 1.2" "8 2.4" "4 0.8" "8 1.6"; do
    set -- $point
    echo "== routing-$1-x$2" >&2
    "$bench" sim --trace "$conv" --replicas "$1" --time-scale "$2" --policy hotprefix,lru \
        --router hotprefix,least-load,round-robin,consistent-hash,approx-tree,global \
        --out "out/sweeps/routing-$1-x$2" "${common[@]}" > "out/sweeps/routing-$1-x$2.md"
done
