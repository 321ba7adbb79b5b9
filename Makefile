# The two commands of the README: `make run` and `make test`. Both are safe to re-run:
# nothing is reinstalled unless pyproject.toml changed, nothing retrained if the store has models.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= $(or $(UPGRADER_DATA),../shared/datasets/cifar10-jpeg)
# Natural photographs (sr-natural): when present, every model also reports its held-out natural validation.
NATURAL ?= $(or $(UPGRADER_NATURAL_DATA),../shared/datasets/sr-natural)
STORE  ?= $(or $(UPGRADER_STORE),store)
HOST   ?= $(or $(UPGRADER_HOST),127.0.0.1)
PORT   ?= $(or $(UPGRADER_PORT),8000)
# The quick profile: a few minutes on 2 CPU cores, enough for a working demo (not the full recipe). L1, cosine
# and dihedral flips, and (with the photos) half of each epoch photo crops on 8-bit inputs: the reference recipe's
# 3 epochs of MSE left subpixel_residual 0.23 dB *below* bicubic on photos, this one +0.48 above.
QUICK_TRAIN ?= --epochs 6 --limit-train 10000 --limit-val 1000 --max-minutes 1.5 --loss l1 --lr 2e-3 --lr-schedule cosine --augment dihedral --amp auto
QUICK_NATURAL ?= --natural-share 0.5 --quantize-inputs

# The models that ship with the repository: pretrained/ is a model store (docs/model-store.md). `make models`
# copies them, verified, into an empty store beside the quick profile's four; the service serves `upgrader` by
# default for 8x8 images, and `photo` when a request names it.
PRETRAINED       ?= pretrained
PRETRAINED_MODELS ?= upgrader photo

# Settings from .env (see .env.example), exported to every command below.
-include .env
export

.PHONY: install run models serve test bench clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: models serve

models: install
	@if $(BIN)/python -c "import sys; from model_store import ModelStore; sys.exit(0 if ModelStore('$(STORE)').models() else 1)"; then \
	  echo "store $(STORE) already has models:"; \
	else \
	  for model in $(PRETRAINED_MODELS); do \
	    if [ -d "$(PRETRAINED)/$$model" ]; then \
	      $(BIN)/python -m model_store --store "$(STORE)" copy --from "$(PRETRAINED)" $$model || exit 1; \
	    fi; \
	  done; \
	  test -d "$(DATA)/train" || { echo "No training data at $(DATA). Set UPGRADER_DATA to an ImageFolder tree with train/ and test/ (or a cifar-10-batches-py directory), or run: $(BIN)/python -m trainer --download --data ./data ..."; exit 2; }; \
	  $(BIN)/python -m trainer --models fc,conv,resnet18,subpixel_residual --data "$(DATA)" --store "$(STORE)" $(QUICK_TRAIN) \
	    $$(test -d "$(NATURAL)/bsd200" && echo --natural "$(NATURAL)" $(QUICK_NATURAL)); \
	fi
	@$(BIN)/python -m model_store --store "$(STORE)" ls

serve: install
	@echo; echo "Upgrader on http://$(HOST):$(PORT) (the page: /, docs: /docs). Try, from another shell:"; \
	echo "  curl -s -H 'Content-Type: image/png' -H 'Accept: image/png' --data-binary @examples/cat-8x8.png http://$(HOST):$(PORT)/upscale -o cat-32x32.png"; \
	echo "  curl -s http://$(HOST):$(PORT)/models"; echo
	UPGRADER_STORE="$(STORE)" $(BIN)/python -m service --host $(HOST) --port $(PORT)

test: install
	$(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)
