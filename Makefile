# Two entry points: `make demo` and `make test`. Both create or refresh .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export KERAS_BACKEND := torch

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,lite,ray,dicom,gpu-decode]"
	@# gpu-decode: nvImageCodec runs on its CPU back end without a GPU, so the tests check the GPU decoder's code.
	@# editable installs skip setup.py's copy of the start-up hook that lets a bare `import keras` use torch
	$(PY) -c "import shutil, sysconfig; shutil.copy('hybrid_transfer_keras.pth', sysconfig.get_paths()['purelib'])"
	@# animal-mnist's declared dependencies pull in TensorFlow; it needs none of them here.
	$(PY) -m pip install -q --no-deps animal-mnist
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) data/prepare_animal_mnist.py --out data/animal_mnist
	$(VENV)/bin/pipeline run --images data/animal_mnist --workdir work/demo

test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The quick loop while developing: everything but the slow end-to-end, fault-injection and Ray tests.
# CI runs the full `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not faults and not ray"; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) bench/make_images.py --out bench/images
	$(PY) bench/stage1.py --rounds 3 --memory-check
	$(PY) bench/stage2.py

clean:
	rm -rf work bench/images
