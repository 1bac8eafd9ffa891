# flowlab: make venv | test | quickstart | benchmark | clean
#
#   make test [TEST_WORKERS=N]         build .venv (when needed) and run the test suite on N
#                                      pytest-xdist workers (default auto: one per core)
#   make quickstart [RUN=runs/NAME]    train, sample and evaluate experiments/quickstart.yaml
#                   [TRAIN_ARGS=...]   into a fresh timestamped run directory (TRAIN_ARGS: overrides
#                                      for train.py, e.g. TRAIN_ARGS="train.steps=50")
#   make benchmark [BENCH_ARGS=...]    throughput of glow_small and glow_cifar10 at batch 16
#                                      (on a CPU glow_cifar10 takes ~1 min/step: BENCH_ARGS="--steps 2 --warmup 1")

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Each quickstart gets its own run directory, so rerunning never touches (or refuses on)
# an earlier run; fixed once per make invocation so train, sample and eval share it.
ifndef RUN
RUN := runs/quickstart-$(shell date +%Y%m%d-%H%M%S)
endif
BENCH_ARGS ?=
# pytest-xdist workers for `make test` (auto: one per core; each gets cores/workers torch threads)
TEST_WORKERS ?= auto
TRAIN_ARGS ?=

# A .venv whose python is missing or does not start is rebuilt from scratch.
VENV_OK := $(shell $(VPY) -c "" >/dev/null 2>&1 && echo yes)

.PHONY: venv test quickstart benchmark clean FORCE

venv: $(STAMP)

# Reinstalled only when requirements.txt is newer than the stamp (or the venv is broken).
# Then the project itself, editable (pyproject.toml): its packages import from any script's folder.
$(STAMP): requirements.txt pyproject.toml $(if $(VENV_OK),,FORCE)
	@if [ -z "$(VENV_OK)" ]; then echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV); $(PYTHON) -m venv $(VENV); fi
	$(VPY) -m pip install --progress-bar off -r requirements.txt
	$(VPY) -m pip install --progress-bar off --no-deps --no-build-isolation -e .
	@touch $@

FORCE:

test: venv
	$(VPY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests

quickstart: venv
	$(VPY) train.py experiments/quickstart.yaml --out $(RUN) $(TRAIN_ARGS)
	$(VPY) sample.py $(RUN) --n 16 --temperature 0.5 --temperature 0.7 --temperature 1.0 --out $(RUN)/samples.png
	$(VPY) eval.py $(RUN) --json $(RUN)/eval.json
	@echo "quickstart run: $(RUN) (samples: $(RUN)/samples.png, eval: $(RUN)/eval.json)"

benchmark: venv
	$(VPY) benchmarks/throughput.py experiments/glow_small.yaml train.batch_size=16 $(BENCH_ARGS)
	$(VPY) benchmarks/throughput.py experiments/glow_cifar10.yaml train.batch_size=16 $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
