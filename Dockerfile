# The gateway image used by helm/novagate (not built by the test suite: no Docker engine on CI).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY protocol protocol
COPY web web
RUN pip install --no-cache-dir -e . && useradd --uid 10001 novagate
USER novagate
ENV NOVAGATE_SECRET_FILE=/tmp/novagate-secret NOVAGATE_SQLITE_PATH=/tmp/novagate.db
# Bound to 0.0.0.0, the gateway needs NOVAGATE_ALLOWED_HOSTS (the names clients use to reach it): set it at run time.
EXPOSE 8000
ENTRYPOINT ["novagate"]
CMD ["serve", "--host", "0.0.0.0"]
