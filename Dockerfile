# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a slim Debian with only the binary, its
# configuration and CA certificates, as an unprivileged user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to the sources does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked --bin smsbatch || true
COPY build.rs diesel.toml ./
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin smsbatch

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin smsbatch
WORKDIR /app
COPY --from=build /src/target/release/smsbatch /usr/local/bin/smsbatch
COPY config ./config
RUN mkdir -p /app/data && chown smsbatch /app/data
USER smsbatch
ENV SMSBATCH__HTTP__BIND=0.0.0.0:8080 \
    SMSBATCH__LOG__FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["smsbatch"]
CMD ["serve"]
