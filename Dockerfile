# certdeploy worker image. Build: docker build -t certdeploy .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: the image builds exactly the dependency versions of Cargo.lock.
RUN cargo build --release --locked -p certdeploy && strip target/release/certdeploy

FROM debian:bookworm-slim
# tini is PID 1: ssh masters started in the background are re-parented to
# PID 1 when they close, and only an init reaps them (without one, every
# closed master stays a zombie).
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 certdeploy \
 && useradd --system --uid 10001 --gid 10001 --home /var/lib/certdeploy --create-home certdeploy
COPY --from=build /src/target/release/certdeploy /usr/local/bin/certdeploy
# Numeric, so a runtime that refuses root by uid can check it.
USER 10001:10001
VOLUME /var/lib/certdeploy
EXPOSE 9464
# /readyz: broker connected, journal open, recovery done. Needs
# metrics_listen on a reachable address (compose sets 0.0.0.0:9464).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=4 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
# SIGTERM reaches the worker through tini: in-flight deployments finish
# within shutdown_grace_s; give the container at least that long to stop.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/usr/local/bin/certdeploy"]
CMD ["worker", "--config", "/etc/certdeploy/certdeploy.toml"]
