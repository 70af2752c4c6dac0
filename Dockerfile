# Build walbust, then ship only the binary on a slim base.
# docker/check-build (run by .ci/run) builds from exactly the files copied here, with the same command.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY sql sql
COPY rules rules
# Cargo.toml declares the benchmarks and the bench example; cargo reads every declared
# target's source, even when building only the binary.
COPY benches benches
COPY bench bench
RUN cargo build --release --locked --bin walbust

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/walbust /usr/local/bin/walbust
USER nobody
# The image has no curl: `walbust health` asks /healthz on the config's [metrics] listen.
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/walbust", "health", "--config", "/etc/walbust/config.toml"]
ENTRYPOINT ["/usr/local/bin/walbust"]
CMD ["run", "--config", "/etc/walbust/config.toml"]
