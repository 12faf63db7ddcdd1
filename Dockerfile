# syntax=docker/dockerfile:1
# wshub and the sample chat backend, built with cargo, run from a small
# non-root image. Build: docker build -t wshub .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, with stub sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY examples/chat-backend/Cargo.toml examples/chat-backend/Cargo.toml
RUN mkdir -p src examples/chat-backend/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > examples/chat-backend/src/main.rs && touch examples/chat-backend/src/lib.rs \
 && cargo build --release --locked --workspace --bins \
 && rm -rf src examples/chat-backend/src
COPY src src
COPY static static
COPY examples examples
# Make sure cargo rebuilds the real sources over the stubs.
RUN touch src/main.rs src/lib.rs examples/chat-backend/src/main.rs examples/chat-backend/src/lib.rs \
 && cargo build --release --locked --workspace --bins

# glibc and CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wshub /usr/local/bin/wshub
COPY --from=build /src/target/release/wshub-chat-backend /usr/local/bin/wshub-chat-backend
COPY wshub.example.toml /etc/wshub/wshub.example.toml
USER 65532:65532
ENV WSHUB_LISTEN=0.0.0.0:8080
EXPOSE 8080
# The binary checks itself: GET /healthz on the configured port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/usr/local/bin/wshub", "healthcheck"]
# SIGTERM starts the drain: /readyz 503, sockets closed with 1001 over
# shutdown.drain_window_ms, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wshub"]
