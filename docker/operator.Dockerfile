# syntax=docker/dockerfile:1
# The operator image: `hotprefix-operator` on distroless (glibc and CA certificates only), as
# its `nonroot` user (65532). The binary talks to the API server over rustls; it needs no
# shell or tools. From the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/hotprefix/hotprefix-operator:0.1.0 .
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hotprefix-operator --bin hotprefix-operator \
    && install -m 0755 target/release/hotprefix-operator /usr/local/bin/hotprefix-operator

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="hotprefix-operator" \
      org.opencontainers.image.source="https://github.com/hotprefix/hotprefix" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/hotprefix-operator /usr/local/bin/hotprefix-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/hotprefix-operator"]
