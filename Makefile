# The README's commands: `make run` (serve the shipped models), `make train` (train the quick profile) and
# `make test`. All are safe to re-run: nothing is reinstalled unless pyproject.toml changed, the store is seeded
# only while it is empty, and `make train` trains only the quick-profile models the store does not hold yet.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= $(or $(UPGRADER_DATA),../shared/datasets/cifar10-jpeg)
# Natural photographs (sr-natural): when present, every model also reports its held-out natural validation.
NATURAL ?= $(or $(UPGRADER_NATURAL_DATA),../shared/datasets/sr-natural)
STORE  ?= $(or $(UPGRADER_STORE),store)
HOST   ?= $(or $(UPGRADER_HOST),127.0.0.1)
PORT   ?= $(or $(UPGRADER_PORT),8000)
# The quick profile (`make train`): four demo models in a few minutes on 2 CPU cores, not the full recipes
# (docs/training.md). L1, a cosine schedule and dihedral flips, and, with the natural photographs, half of each
# epoch photo crops on 8-bit inputs, so subpixel_residual also learns the photos the service is sent.
QUICK_MODELS ?= fc,conv,resnet18,subpixel_residual
QUICK_TRAIN ?= --epochs 6 --limit-train 10000 --limit-val 1000 --max-minutes 1.5 --loss l1 --lr 2e-3 --lr-schedule cosine --augment dihedral --amp auto
QUICK_NATURAL ?= --natural-share 0.5 --quantize-inputs

# The models that ship with the repository: pretrained/ is a model store (docs/model-store.md). `make models`
# copies them, verified, into an empty store; the service serves `upgrader` by default for 8x8 images, and
# `photo` when a request names it. No training data is needed for that.
PRETRAINED       ?= pretrained
PRETRAINED_MODELS ?= upgrader photo

# Settings from .env (see .env.example), exported to every command below.
-include .env
export

.PHONY: install run models train serve test bench clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

# install, seed the store from pretrained/ if it is empty, serve: no data, no training
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
	fi
	@$(BIN)/python -m model_store --store "$(STORE)" ls

# the quick profile's models the store does not hold yet, trained on CIFAR-10 at DATA (and the photographs at NATURAL)
train: models
	@if [ ! -d "$(DATA)/train" ] && [ ! -f "$(DATA)/batches.meta" ] && [ ! -f "$(DATA)/cifar-10-batches-py/batches.meta" ]; then \
	  echo "No training data at $(DATA)."; \
	  echo "Point UPGRADER_DATA at CIFAR-10: an ImageFolder tree with train/ and test/, or a cifar-10-batches-py directory;"; \
	  echo "or fetch CIFAR-10 (170 MB, needs the internet): make train UPGRADER_DATA=./data TRAIN_ARGS=--download"; \
	  echo "(the trainer's --download: $(BIN)/python -m trainer --download --data ./data ...). See CONTRIBUTING.md."; \
	  test -n "$(findstring --download,$(TRAIN_ARGS))" || exit 2; \
	fi
	@missing=$$($(BIN)/python -c "from model_store import ModelStore; have = set(ModelStore('$(STORE)').models()); print(','.join(m for m in '$(QUICK_MODELS)'.split(',') if m not in have))"); \
	if [ -z "$$missing" ]; then \
	  echo "store $(STORE) already holds the quick profile ($(QUICK_MODELS)): nothing to train"; \
	else \
	  $(BIN)/python -m trainer --models "$$missing" --data "$(DATA)" --store "$(STORE)" $(QUICK_TRAIN) $(TRAIN_ARGS) \
	    $$(test -d "$(NATURAL)/bsd200" && echo --natural "$(NATURAL)" $(QUICK_NATURAL)) || exit $$?; \
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
