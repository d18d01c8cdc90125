#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the
# release `gpu_check` example, stripped (the release profile keeps line tables, which take the
# binary past what the device tool carries; stripped it is a few MiB), at .gpu/gpu_check.
# Then, with the device tool: carry [".gpu"] and run `bash scripts/gpu-check.sh $OUT`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p hotprefix-engine --example gpu_check
mkdir -p .gpu
cp target/release/examples/gpu_check .gpu/gpu_check.part
strip .gpu/gpu_check.part
mv .gpu/gpu_check.part .gpu/gpu_check
echo "gpu-build: .gpu/gpu_check ($(du -h .gpu/gpu_check | cut -f1))"
