# The two set-up commands of README.md: `make demo` and `make test`. Both install into
# .venv/ idempotently (the stamp file is rebuilt only when pyproject.toml or the pinned
# versions in constraints.txt change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint unit bench bench-quick up down clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	@command -v java >/dev/null || { echo "Java 17+ is needed for Kafka: apt-get install -y openjdk-17-jre-headless"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q openjdk-17-jre-headless; else exit 1; fi; }
	@command -v mvn >/dev/null || { echo "Maven is needed once to fetch the Kafka jars: apt-get install -y maven"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q maven; else exit 1; fi; }
	@command -v chromium >/dev/null || { echo "Chromium is needed for the dashboard's browser test: apt-get install -y chromium"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q chromium; fi; }
	@command -v docker-compose >/dev/null || { echo "Debian's docker-compose validates docker-compose.yml in the tests: apt-get install -y docker-compose"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q docker-compose; fi; }
	@command -v kcat >/dev/null || { echo "kcat is needed for the foreign-producer poison test: apt-get install -y kcat"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q kcat; fi; }
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "from sluice.settings import load_settings; from sluice.processes import kafka_jars; print('Kafka jars in', kafka_jars(load_settings()))"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/sluice demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy schemas streams agents trainer sluice
	$(BIN)/lint-imports

test: install
	$(MAKE) lint
	$(BIN)/pytest -q -p no:cacheprovider

unit: install
	$(BIN)/pytest -q -m "not integration"

bench: install
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/python -m bench.run --quick

up: install
	$(BIN)/sluice up

down:
	$(BIN)/sluice down

clean:
	-$(BIN)/sluice down
	rm -rf .sluice .pytest_cache .mypy_cache .ruff_cache
