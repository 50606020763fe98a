# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates the virtual environment it needs on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXAMPLES := boundflow/examples/data

.PHONY: venv demo test clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/boundflow verify --model $(EXAMPLES)/digits_cnn.pt2 --input $(EXAMPLES)/digits_x.npy --eps 0.01 --method ibp | tail -1
	$(BIN)/boundflow tune --model $(EXAMPLES)/digits_cnn.pt2 --input $(EXAMPLES)/digits_x.npy --eps 0.01 --method crown-ibp --db $(VENV)/tuning.db --seconds 60 --trials 24
	$(BIN)/boundflow verify --model $(EXAMPLES)/digits_cnn.pt2 --input $(EXAMPLES)/digits_x.npy --eps 0.01 --method crown-ibp --db $(VENV)/tuning.db | tail -2

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
