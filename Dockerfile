# One image for every sluice service (worker, trainer, topics); see docker-compose.yml.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends default-jre-headless \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY schemas schemas
COPY streams streams
COPY agents agents
COPY trainer trainer
COPY sluice sluice
COPY infra infra
# The tested versions (constraints.txt), not whatever is newest on the day of the build.
RUN pip install --no-cache-dir -c constraints.txt .
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CMD ["sluice", "--help"]
