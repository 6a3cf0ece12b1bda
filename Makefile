# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the project's virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch first, so resolving the project never pulls a multi-GB CUDA build.
# On a GPU machine, set TORCH_SPEC to the CUDA build you want (or to "" to skip).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,distributed,pipeline,k8s
# DeepSpeed builds its C++/CUDA ops lazily at run time; nothing is compiled at install.
export DS_BUILD_OPS ?= 0
export L2T_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: venv demo demo-core test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

# the main job: the whole Dagster asset lineage on the embedded default (dagster_home/)
demo: venv
	DAGSTER_HOME=$(abspath dagster_home) $(PY) -m l2t_pipeline.demo

# the reward path alone: every method's rewards on one batch of the warm-started model
demo-core: venv
	$(PY) -m l2t_core.demo

# the 25 slowest tests are listed at the end: CI must stay under 20 minutes
test: venv
	$(PY) -m pytest -q --durations=25

bench: venv
	$(PY) -m bench.penalty

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
