# Two entry points: `make demo` (compress the bundled MiniLM with the bundled calibration text,
# evaluate on held-out text, export ONNX, print the report) and `make test`.
# Both create .venv on first use. torch is pinned (pyproject.toml) so pip takes the CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: demo test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/lowrank compress minilm out/minilm-lowrank --overwrite --calibration --evaluate \
		--export onnx

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/compress_speed.py
