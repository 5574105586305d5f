# HAProxy from Debian 12's packages (2.6, the version the scale-out tests run) with docker/haproxy.cfg.
# Built by docker-compose.yml (context docker/).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends haproxy curl \
 && rm -rf /var/lib/apt/lists/*
COPY haproxy.cfg /etc/haproxy/haproxy.cfg
USER haproxy
EXPOSE 8000 8443 8404
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
