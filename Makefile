# `make train` and `make test` install what they need (idempotent) into .venv, then train / run pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: install train train-shapes test mutants toy clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q "torch==2.13.0" -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The default job (ODE-AM on the embedded digits base); more flags: make train ARGS="--max_train_steps 10".
train: install
	$(PY) -m diffusers_am.train $(ARGS)

# The main text-to-image path on a CPU: ODE-AM on the shipped FLUX.2-klein miniature (shapes-klein), 100 updates.
train-shapes: install
	$(PY) -m diffusers_am.train --pretrained shapes-klein $(ARGS)

test: install
	$(PY) -m pytest tests

# The mutation suite (tools/mutants.py): plausible bugs put into a temporary copy one at a time, each must fail
# its tests. Only some: make mutants ARGS="adjoint-sign resume"; the catalogue: make mutants ARGS=--list.
mutants: install
	$(PY) tools/mutants.py $(ARGS)

toy: install
	$(PY) examples/gaussian_toy.py

clean:
	rm -rf $(VENV) build dist *.egg-info
