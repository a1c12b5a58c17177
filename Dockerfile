# One image for every chronotick-ntp service (worker, beat, Flower, relay).
# Every package pyproject.toml names is copied: tests/integration/test_compose.py installs
# from exactly these COPY lines.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY workers workers
COPY orchestrator orchestrator
COPY relay relay
COPY simulator simulator
COPY configs configs
RUN pip install --no-cache-dir . \
 && useradd --system --no-create-home chronotick
# Nothing here needs root: queries use ephemeral UDP ports.
USER chronotick
ENTRYPOINT []
