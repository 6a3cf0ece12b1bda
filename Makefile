# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the project's virtual environment in $(VENV).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch first, so resolving the project never pulls a multi-GB CUDA build.
# On a GPU machine, set TORCH_SPEC to the CUDA build you want (or to "" to skip).
TORCH_SPEC ?= torch==2.13.0
# Where that torch comes from: a local wheel directory where pip has one (PIP_FIND_LINKS, as on the CI
# machines); else, on a machine without an NVIDIA driver, PyTorch's CPU index (PyPI's Linux torch is
# the CUDA build). TORCH_INDEX= (empty) turns it off.
TORCH_INDEX ?= $(if $(PIP_FIND_LINKS)$(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
EXTRAS ?= dev,distributed,pipeline,k8s
# DeepSpeed builds its C++/CUDA ops lazily at run time; nothing is compiled at install.
export DS_BUILD_OPS ?= 0
export L2T_DATA_DIR ?= $(abspath ../shared/data)
# The installer: uv resolves and installs the same packages as pip (measured: 1 min instead of 3 on
# 2 cores, bytecode compiled as pip does); INSTALLER=pip uses pip alone. If uv cannot be installed
# or fails, pip installs everything.
INSTALLER ?= uv
# pip's local wheel directories (the CPU torch wheel of this machine), passed on to uv, which reads no pip config
UV_FIND_LINKS := $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))

.PHONY: venv install-with-uv install-with-pip demo demo-core test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install -q uv && $(MAKE) --no-print-directory install-with-uv; then :; \
	else $(MAKE) --no-print-directory install-with-pip; fi
	touch $@

# one resolution: TORCH_SPEC holds torch to the build asked for while the project's packages resolve
install-with-uv:
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode $(UV_FIND_LINKS) \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match) \
		$(if $(TORCH_SPEC),"$(TORCH_SPEC)") -e ".[$(EXTRAS)]"

install-with-pip:
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
		"$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"

venv: $(VENV)/.installed

# the main job: the whole Dagster asset lineage on the embedded default (dagster_home/)
demo: venv
	DAGSTER_HOME=$(abspath dagster_home) $(PY) -m l2t_pipeline.demo

# the reward path alone: every method's rewards on one batch of the warm-started model
demo-core: venv
	$(PY) -m l2t_core.demo

# Two pytest-xdist workers, a test file to each in turn (a file's module fixtures are made once), in
# the order tests/conftest.py gives (slow files first, files with `exclusive` tests last); tests
# marked `exclusive` run alone (tests/_exclusive.py). TEST_WORKERS=0 runs them in one process.
# The 25 slowest tests are listed at the end: CI must stay under 20 minutes.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: venv
	$(PY) -m bench.penalty

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
