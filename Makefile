# Two commands a newcomer needs (see README):  make demo   |   make test
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test fuzz venv lock clean

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

# The hostile-input properties with many random examples, then the partial JPEG decoder under ASan + UBSan
# over a corpus of mutated JPEGs (docs/testing.md). Minutes, not part of `make test`.
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -q tests/unit/test_hostile_properties.py
	$(BIN)/python bench/fuzz_jpeg_region.py --inputs $${FUZZ_INPUTS:-20000}

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu//' > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs data
