# The gateway for production: point DATABASE_URL and REDIS_URL at your servers.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install ".[fast]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gateway
COPY --from=build /install /usr/local
COPY rules.yaml /etc/gateway/rules.yaml
# The data directory (the workers' shared metrics, embedded stores) must be writable by
# the non-root user: the default ./.gateway would be /.gateway.
ENV GATEWAY_RULES=/etc/gateway/rules.yaml \
    GATEWAY_DATA_DIR=/home/gateway/.gateway \
    GATEWAY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
WORKDIR /home/gateway
USER gateway
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
# One worker per core (SO_REUSEPORT); SIGTERM finishes and settles requests in flight.
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
