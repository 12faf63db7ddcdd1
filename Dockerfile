# syntax=docker/dockerfile:1
# wshub and the sample chat backend, built with cargo, run from a small
# non-root image. Build: docker build -t wshub .

FROM rust:1.95-slim-bookworm AS build
# jemalloc, the binary's allocator, is built from C by its crate's build
# script: the image has gcc, and its configure step needs make (the
# release's own make, not pinned: a pinned Debian version breaks the build
# when the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, with stub sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change.
# Every workspace member's manifest must be present for cargo to load the
# workspace, the benchmark's too, although it is not built here.
COPY Cargo.toml Cargo.lock ./
COPY examples/chat-backend/Cargo.toml examples/chat-backend/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src examples/chat-backend/src bench/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > examples/chat-backend/src/main.rs && touch examples/chat-backend/src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked -p wshub -p wshub-chat-backend \
 && rm -rf src examples/chat-backend/src
COPY src src
COPY static static
COPY examples examples
# Make sure cargo rebuilds the real sources over the stubs.
RUN touch src/main.rs src/lib.rs examples/chat-backend/src/main.rs examples/chat-backend/src/lib.rs \
 && cargo build --release --locked -p wshub -p wshub-chat-backend

# glibc and CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wshub /usr/local/bin/wshub
COPY --from=build /src/target/release/wshub-chat-backend /usr/local/bin/wshub-chat-backend
COPY wshub.example.toml /etc/wshub/wshub.example.toml
USER 65532:65532
# The default listen address is 0.0.0.0:8080. No WSHUB_LISTEN here: it would
# override the file's `listen`. Give a configuration file with WSHUB_CONFIG
# (not --config) so that the health check below reads the same file.
EXPOSE 8080
# The binary checks itself: GET /healthz on the port of the configuration
# it loads (WSHUB_CONFIG and WSHUB_* variables, as the server does).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/usr/local/bin/wshub", "healthcheck"]
# SIGTERM starts the drain: /readyz 503, sockets closed with 1001 over
# shutdown.drain_window_ms, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wshub"]
