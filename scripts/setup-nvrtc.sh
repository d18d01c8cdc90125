#!/usr/bin/env bash
# Fetches NVIDIA's NVRTC (the run-time CUDA C compiler) from PyPI into .cache/nvrtc/lib, so the
# kernel compile check (engine/tests/cuda.rs) runs on machines with no CUDA installed (CI).
# Only libnvrtc is needed: the kernels include no CUDA header. Idempotent; prints the library
# folder to put on LD_LIBRARY_PATH (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."

# CUDA 12.9's NVRTC: compiles for sm_80 and sm_90 like the CUDA 13 one on the GPU machines, and
# its wheel runs on any x86-64 glibc 2.17+ Linux.
VERSION=12.9.86
DIR=.cache/nvrtc
LIB=$DIR/lib

if [ -f "$LIB/libnvrtc.so.12" ] && [ -f "$DIR/version" ] && [ "$(cat "$DIR/version")" = "$VERSION" ]; then
    echo "setup-nvrtc: $LIB has NVRTC $VERSION" >&2
    echo "$PWD/$LIB"
    exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 is needed to fetch the NVRTC wheel" >&2
    exit 1
fi
rm -rf "$DIR"
mkdir -p "$DIR/wheel" "$LIB"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    --python-version 3 --implementation py \
    -d "$DIR/wheel" "nvidia-cuda-nvrtc-cu12==$VERSION" >&2
python3 - "$DIR/wheel" "$LIB" <<'EOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "nvidia_cuda_nvrtc_cu12-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if "/lib/" in name and base.startswith("libnvrtc") and ".alt." not in base:
            with z.open(name) as src, open(os.path.join(sys.argv[2], base), "wb") as dst:
                dst.write(src.read())
EOF
rm -rf "$DIR/wheel"
echo "$VERSION" >"$DIR/version"
echo "setup-nvrtc: $LIB has NVRTC $VERSION" >&2
echo "$PWD/$LIB"
