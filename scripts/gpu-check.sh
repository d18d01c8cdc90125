#!/usr/bin/env bash
# The GPU check of the CUDA backend (issue 6): correctness against the CPU backend and speed
# against the card's limits, on a machine with an NVIDIA GPU (compute capability 8.0 or later)
# and a CUDA 12/13 driver, NVRTC and cuBLAS. Runs every section of engine/examples/gpu_check.rs
# as its own process (a device fault in one cannot poison the others), each under a timeout, and
# leaves OUT/gpu-check.md (the summary), OUT/gpu-check.jsonl (every figure) and
# OUT/gpu-check.log.
#
#   bash scripts/gpu-check.sh [OUT]
#
# With cargo, it builds the release example first. Without (a GPU machine with no Rust
# toolchain), it runs a binary built elsewhere: $HOTPREFIX_GPU_CHECK_BIN, else .gpu/gpu_check
# (`cargo build --release -p hotprefix-engine --example gpu_check` and copy
# target/release/examples/gpu_check there). HOTPREFIX_GPU_SECTIONS picks sections (default:
# all); HOTPREFIX_GPU_LAYERS sets the performance model's layer count (default 8);
# HOTPREFIX_GPU_TIMEOUT overrides every section's time limit (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT"
BIN=${HOTPREFIX_GPU_CHECK_BIN:-}
if [ -z "$BIN" ]; then
    if [ -x .gpu/gpu_check ]; then
        BIN=.gpu/gpu_check
    elif command -v cargo >/dev/null 2>&1; then
        cargo build --release -p hotprefix-engine --example gpu_check || exit 2
        BIN=target/release/examples/gpu_check
    else
        echo "gpu-check: no gpu_check binary (.gpu/gpu_check) and no cargo to build one" >&2
        exit 2
    fi
fi

# The driver's libcuda and a CUDA toolkit's (or PyTorch's pip wheels') NVRTC and cuBLAS, found
# wherever this machine keeps them, go on the library path; cudarc opens them by name.
libdirs=""
for name in libcuda.so.1 libnvrtc.so.13 libnvrtc.so.12 libcublas.so.13 libcublas.so.12 \
    libcublasLt.so.13 libcublasLt.so.12; do
    # (No `ldconfig | grep -q`: under pipefail, grep leaving early fails the pipeline.)
    case "$(ldconfig -p 2>/dev/null)" in
        *"$name"*) continue ;;
    esac
    # CUDA images' compat/ folders hold a forward-compatibility libcuda that must not shadow
    # the installed driver's, and stubs/ ones only link-time stand-ins.
    for root in /usr/local/nvidia /usr/local/cuda /usr/local /usr/lib /opt; do
        [ -d "$root" ] || continue
        found=$(find "$root" -maxdepth 8 -name "$name" -not -path '*/compat/*' \
            -not -path '*/stubs/*' -print -quit 2>/dev/null)
        if [ -n "$found" ]; then
            libdirs="$libdirs:$(dirname "$found")"
            break
        fi
    done
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$OUT/gpu-check.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 \
    | tee -a "$OUT/gpu-check.log"

# Seconds each section may take at most (the slowest, ttft, loads a 4.6 GB model twice), and
# the whole run's budget (HOTPREFIX_GPU_BUDGET, default 540 s: one command on a lent GPU
# machine may run 600 s). A section that the rest of the budget cannot cover is skipped and
# named, to be run on its own with HOTPREFIX_GPU_SECTIONS.
declare -A LIMIT=(
    [device]=30 [ops]=60 [logits]=60 [greedy]=90 [ceilings]=30 [prefill]=45 [decode]=45
    [transfers]=45 [ttft]=90
)
SECTIONS=${HOTPREFIX_GPU_SECTIONS:-device ops logits greedy ceilings prefill decode transfers ttft}
LAYERS=${HOTPREFIX_GPU_LAYERS:-8}
deadline=$(($(date +%s) + ${HOTPREFIX_GPU_BUDGET:-540}))
failed=0
passed=()
failures=()
skipped=()
for s in $SECTIONS; do
    start=$(date +%s)
    limit=${HOTPREFIX_GPU_TIMEOUT:-${LIMIT[$s]:-90}}
    left=$((deadline - start))
    if [ "$left" -lt 10 ]; then
        skipped+=("$s")
        echo "gpu-check: section $s skipped (budget spent)" | tee -a "$OUT/gpu-check.log"
        continue
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout "$limit" "$BIN" --section "$s" --out "$OUT" --layers "$LAYERS" \
        2>>"$OUT/gpu-check.log" | tee -a "$OUT/gpu-check.log"
    rc=${PIPESTATUS[0]}
    echo "gpu-check: section $s exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/gpu-check.log"
    if [ "$rc" -eq 0 ]; then
        passed+=("$s")
    else
        failed=1
        failures+=("$s")
        if [ "$rc" -eq 124 ]; then
            printf '\n## %s\n\n- TIMEOUT after %s s\n' "$s" "$limit" >>"$OUT/gpu-check.md"
        fi
    fi
done
[ "${#skipped[@]}" -gt 0 ] && failed=1
summary="gpu-check: $([ "$failed" -eq 0 ] && echo PASS || echo FAIL): passed: ${passed[*]:-none}; failed: ${failures[*]:-none}; skipped: ${skipped[*]:-none}"
printf '\n%s\n' "$summary" >>"$OUT/gpu-check.md"
echo "$summary" | tee -a "$OUT/gpu-check.log"
echo "gpu-check: summary in $OUT/gpu-check.md"
exit $failed
