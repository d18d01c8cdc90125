# syntax=docker/dockerfile:1
# The engine image: `hotprefix-engine` on NVIDIA's CUDA runtime, whose cuBLAS and NVRTC the
# CUDA backend loads at run time (the driver comes from the node, through the NVIDIA container
# toolkit); on a node without a GPU the engine runs its CPU backend. Non-root (65532), every
# setting from HOTPREFIX_* variables (the operator's ConfigMap). From the repository root:
#   docker build -f docker/engine.Dockerfile -t ghcr.io/hotprefix/hotprefix-engine:0.1.0 .
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
# CUDA 13 matches the `cuda-13000` build of the backend (driver 580 or newer on the nodes).
ARG CUDA_IMAGE=docker.io/nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hotprefix-engine --bin hotprefix-engine \
    && install -m 0755 target/release/hotprefix-engine /usr/local/bin/hotprefix-engine

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="hotprefix-engine" \
      org.opencontainers.image.source="https://github.com/hotprefix/hotprefix" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/hotprefix-engine /usr/local/bin/hotprefix-engine
# The user has no passwd entry; HOME points at the writable /tmp volume the pods mount.
ENV HOME=/tmp \
    HOTPREFIX_LISTEN=0.0.0.0:8000 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/hotprefix-engine"]
