# certdeploy worker image. Build: docker build -t certdeploy .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p certdeploy && strip target/release/certdeploy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/certdeploy --create-home certdeploy
COPY --from=build /src/target/release/certdeploy /usr/local/bin/certdeploy
USER certdeploy
VOLUME /var/lib/certdeploy
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/certdeploy"]
CMD ["worker", "--config", "/etc/certdeploy/certdeploy.toml"]
