# Two commands a newcomer needs (see README):  make demo   |   make test
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test venv lock clean

# torch is installed first, from the pin in constraints.txt, so that nothing later in the resolve
# can pull a multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml constraints.txt data_pipeline/image/_jpeg_region.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python pretrain/main.py --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup -m "not serial"
	$(BIN)/python -m pytest -q -ra -m serial

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs data
