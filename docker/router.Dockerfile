# syntax=docker/dockerfile:1
# The router image: `hotprefix-router` on distroless (glibc, CA certificates, nothing else:
# no shell, no package manager), as its `nonroot` user (65532). From the repository root:
#   docker build -f docker/router.Dockerfile -t ghcr.io/hotprefix/hotprefix-router:0.1.0 .
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
# Debian 12, the builder's glibc.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hotprefix-router --bin hotprefix-router \
    && install -m 0755 target/release/hotprefix-router /usr/local/bin/hotprefix-router

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="hotprefix-router" \
      org.opencontainers.image.source="https://github.com/hotprefix/hotprefix" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/hotprefix-router /usr/local/bin/hotprefix-router
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/hotprefix-router"]
