# runcache image: the cache service, plus the `sample-origin` subcommand used by docker-compose.
#
#   docker build -t runcache:local .
#   docker run --rm -p 8080:8080 runcache:local            # serve (in-process store without Redis)
#   docker run --rm runcache:local sample-origin --addr 0.0.0.0:8000 --delay-ms 300

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /app

# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && echo '//! stub' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# COPY keeps the build context's timestamps, which may be older than the stub build above;
# touching the crate roots makes cargo rebuild the crate itself (and only it).
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

# ---- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 runcache \
    && useradd --system --uid 10001 --gid runcache --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin runcache \
    && mkdir -p /var/lib/runcache \
    && chown runcache:runcache /var/lib/runcache

WORKDIR /app
COPY --from=builder /app/target/release/runcache /usr/local/bin/runcache
# The binary reads config/default.toml relative to its working directory.
COPY config/ /app/config/

USER runcache:runcache
ENV RUNCACHE__SERVER__ADDR=0.0.0.0:8080
# The outage journal must survive restarts: mount a volume here (docker-compose.yml does).
ENV RUNCACHE__JOURNAL__PATH=/var/lib/runcache/journal.log
VOLUME /var/lib/runcache
EXPOSE 8080
# No HEALTHCHECK: the slim image has no HTTP client; orchestrators probe GET /health and
# GET /ready from outside.

ENTRYPOINT ["runcache"]
