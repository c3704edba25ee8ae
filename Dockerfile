# confab: build with the pinned toolchain, run as a non-root user on a slim
# Debian. No container engine runs on the project's machines: tests/it/ops.rs
# checks that the build command below is the one .ci/run builds with.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p confab-server

FROM debian:bookworm-slim
# CA roots for the model providers' TLS; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/confab --create-home confab
COPY --from=build /src/target/release/confab /usr/local/bin/confab
USER confab
WORKDIR /var/lib/confab
ENV HOST=0.0.0.0 PORT=3000 LOG_FORMAT=json
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["confab", "healthcheck"]
ENTRYPOINT ["confab"]
CMD ["serve"]
