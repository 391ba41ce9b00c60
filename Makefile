# novagate — two commands: `make run` (gateway on the embedded default) and `make test`.
SHELL := /bin/sh
VENV  := .venv
PY    := $(VENV)/bin/python
HOST  ?= 127.0.0.1
PORT  ?= 8000
# `make run WORKERS=0`: one worker process per CPU (novagate serve --workers)
WORKERS ?= 1

.PHONY: run test venv dev clean contract-aws bench bench-rotation bench-local bench-workers bench-capacity bench-realtime bench-codecs fuzz nginx browser promtool checkov

# The virtualenv is rebuilt when pyproject.toml changes; the interpreter is found by scripts/find-python
# (PYTHON=... overrides it).
$(VENV)/.runtime: pyproject.toml scripts/find-python
	@py=$$(PYTHON="$(PYTHON)" ./scripts/find-python) || exit 1; \
	 if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then \
	   echo "novagate: creating $(VENV) with $$py"; rm -rf $(VENV); "$$py" -m venv $(VENV) || exit 1; fi
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[local]'
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

venv: $(VENV)/.runtime
dev: $(VENV)/.dev

run: $(VENV)/.runtime
	@mkdir -p var
	@echo "novagate: http://$(HOST):$(PORT)/  (WebSocket ws://$(HOST):$(PORT)/v1/voice; Ctrl-C to stop)"
	NOVAGATE_HOST=$(HOST) NOVAGATE_PORT=$(PORT) $(VENV)/bin/novagate serve --engine local --store sqlite --sqlite-path var/novagate.db --workers $(WORKERS)

# Real-time audio dominates the suite, not CPU: test files run in parallel worker processes.
PYTEST_ARGS ?= -n 4 --dist loadfile
nginx: ; ./scripts/install-nginx
browser: ; ./scripts/install-browser
promtool: ; ./scripts/install-promtool
checkov: ; ./scripts/install-checkov

test: $(VENV)/.dev nginx browser promtool checkov
	NOVAGATE_REQUIRE_TOOLS=1 $(PY) -m pytest $(PYTEST_ARGS)

# Against real AWS (skipped without credentials): Agent Runtime assumptions and one Nova Sonic turn.
# AWS_REGION / NOVAGATE_CONTRACT_REGION pick the region; NOVAGATE_MODEL_ID the model.
contract-aws: $(VENV)/.dev
	$(PY) -m pytest contract -v -s -p no:xdist

bench: $(VENV)/.dev
	$(PY) scripts/bench_resume.py

bench-rotation: $(VENV)/.dev
	$(PY) scripts/bench_rotation.py

# CPU per talking session on the Bedrock wire path, side by side with another checkout (BASELINE=path of a
# git worktree, e.g. of 3bd6c99), then overload at OVERLOAD sessions (docs/capacity.md): about 10 minutes.
BASELINE ?=
OVERLOAD ?= 0
bench-capacity: $(VENV)/.dev
	@mkdir -p var
	$(PY) scripts/bench_capacity.py $(if $(BASELINE),--baseline $(BASELINE)) --overload $(OVERLOAD) --plot var/capacity.svg --json var/capacity.json

# Sessions per machine with 1 and 2 worker processes (scripted engine, novagate loadtest): about 8 minutes.
bench-workers: $(VENV)/.dev
	$(PY) scripts/bench_workers.py

# What /v1/realtime's base64-in-JSON audio costs per second of audio, against /v1/voice's binary frames.
bench-realtime: $(VENV)/.dev
	$(PY) scripts/bench_realtime.py

# What Opus and G.711 cost the gateway per 20 ms frame (PyAV), and their bit rates.
bench-codecs: $(VENV)/.dev
	$(PY) scripts/bench_codecs.py

# The local engine's demo configuration (whisper + hibari): model load, per-turn latency.
bench-local: $(VENV)/.dev
	$(PY) scripts/bench_local_engine.py

# The live fuzzer against its own gateway: 100,000 random and mutated frames while a healthy session talks.
fuzz: $(VENV)/.dev
	$(PY) scripts/fuzz_live.py --spawn --cases 100000 --connections 50 $(if $(SEED),--seed $(SEED))

clean:
	rm -rf $(VENV) var .pytest_cache build *.egg-info
