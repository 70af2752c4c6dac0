# Build walbust, then ship only the binary on a slim base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY sql sql
COPY rules rules
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/walbust /usr/local/bin/walbust
USER nobody
ENTRYPOINT ["/usr/local/bin/walbust"]
CMD ["run", "--config", "/etc/walbust/config.toml"]
