# syntax=docker/dockerfile:1
# One image with every service binary and the `chat` CLI; each Kubernetes workload runs its own
# (charts/chat sets `command`). Build from the repository root:
#   docker build -t chat:0.1.0 .

# --- build -----------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# aws-sdk-s3 (media) builds aws-lc-sys, a C library: it needs cmake and a C compiler (clang).
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole workspace: chat-protocol embeds the stream definitions of nats/ at build time.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin gateway --bin sequencer --bin fanout-worker --bin media --bin presence --bin chat \
    && mkdir -p /out \
    && cp target/release/gateway target/release/sequencer target/release/fanout-worker \
          target/release/media target/release/presence target/release/chat /out/

# --- run -------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# CA certificates for S3 over TLS; nothing else is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 chat \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin chat
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
ENV LOG_FORMAT=json
# Admin endpoint (/healthz, /readyz, /metrics) of every service; the gateway's WebSocket and the
# media API listen on 8080 and 8070 when configured so (charts/chat does).
EXPOSE 9090 8080 8070
CMD ["/usr/local/bin/gateway"]
