# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench proto lint clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is a range in pyproject so GPU users keep their CUDA build; with no torch here, take the
	# CPU wheel (an unpinned torch would pull a multi-GB CUDA build). TORCH_SPEC overrides.
	if [ -n "$$TORCH_SPEC" ]; then $(PY) -m pip install -q "$$TORCH_SPEC"; \
	elif ! $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[dev,gds]"
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

# lint runs first: CI's only command is `make test`, and types are part of the contract (STYLE.md)
test: lint
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/run.py

# Regenerates the committed stubs; tests/test_proto.py fails when they drift from the .proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc --proto_path=cached_client/_proto=proto/cached/v1 \
	  --python_out=client --pyi_out=client --grpc_python_out=client \
	  cached_client/_proto/cache.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check cached client bench examples tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info client/*.egg-info
