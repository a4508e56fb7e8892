# syntax=docker/dockerfile:1.7
# One image for every target: `csp serve --target <all|gateway|auth|design|registry|executor|collab|ai>`,
# `csp migrate`, `csp admin create-user`, `csp health`.

# --- build: the workspace's toolchain (protobufs compile with protox: no protoc) ---
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin csp \
    && install -D -m 0755 target/release/csp /out/csp

# --- run: glibc and CA certificates, nothing else; no shell, non-root ---
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="csp" \
      org.opencontainers.image.description="CSP Designer: every service and the gateway in one binary" \
      org.opencontainers.image.source="https://example.invalid/csp-designer" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/csp /usr/local/bin/csp
WORKDIR /var/lib/csp
ENV CSP_DATABASE__DATA_DIR=/var/lib/csp \
    LOG_FORMAT=json
# distroless "nonroot"
USER 65532:65532
EXPOSE 8080
# The gateway's port; other targets override it (`csp health --addr 127.0.0.1:<port>`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["csp", "health", "--addr", "127.0.0.1:8080"]
ENTRYPOINT ["csp"]
CMD ["serve", "--target", "all"]
