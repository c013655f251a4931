# osmseg: segment satellite imagery with OpenStreetMap labels.
#
#   make demo    the whole pipeline on the offline demo world (no network, no account)
#   make test    the test suite
#
# Every target installs what it needs into .venv first. The variables below are the
# seed's; override them on the command line (make data/sample.txt BBOX=... TRAIN_SIZE=...).
# Each stage's script skips work that is already done, so re-running resumes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# Where the OSM data comes from and which tiles to sample (the seed's defaults).
QA_TILES ?= united_kingdom
BBOX ?= -3.3843,51.2437,-2.3923,51.848
TRAIN_SIZE ?= 10000
CLASSES ?= classes/mine.json
ZOOM_LEVEL ?= 17
LABEL_RATIO ?= 0
SEED ?= 0
TILE_SIZE ?= 256
TEST_SIZE ?= 0.1
OSM_SOURCE ?= qa-tiles
OSM ?= data/osm/$(QA_TILES).mbtiles
QA_TILES_URL ?= https://s3.amazonaws.com/mapbox/osm-qa-tiles-production/latest.country/
OVERPASS_URL ?= https://overpass-api.de/api/interpreter
# With OSM_SOURCE=overpass there is no file to make first: all-tiles asks the API and
# saves its answer at $(OSM) (e.g. OSM=data/osm/overpass.osm).
OSM_PREREQ := $(if $(filter overpass,$(OSM_SOURCE)),,$(OSM))
# The token stays a literal placeholder here: prepare.py substitutes it from the
# environment, so it never shows in make's echo of a command line.
IMAGE_TILES ?= tilejson+https://a.tiles.mapbox.com/v4/mapbox.satellite.json?access_token=$$(MapboxAccessToken)
WORKERS ?= 8
# One machine's part of the labels, images and cache stages: SHARD=I SHARDS=N does part I
# (0..N-1) of N (prepare.py --shard I/N), e.g. SHARD=$$SLURM_ARRAY_TASK_ID in an array job.
# SHARDS=N without SHARD on data/training.hdf5 joins the N shard caches (prepare.py merge-cache).
SHARD ?=
SHARDS ?=
SHARD_FLAG := $(if $(SHARD),--shard $(SHARD)/$(SHARDS))
CACHE_COMMAND := $(if $(SHARD),cache $(SHARD_FLAG),$(if $(SHARDS),merge-cache --shards $(SHARDS),cache))
# Every shard changes the folders' times, so make cannot tell from them whether this machine's
# part is done: in a shard run (SHARD set) the labels and images targets, and with SHARDS set
# the cache target, always run their command (which skips finished work) and build none of
# their prerequisites (make those first, in one job: README, "Preparing data on many machines").
ifneq ($(SHARD),)
.PHONY: data/labels/color data/images
endif
ifneq ($(SHARDS),)
.PHONY: data/training.hdf5 data/testing.hdf5
endif
UNLESS_SHARD = $(if $(SHARD),,$(1))
UNLESS_SHARDS = $(if $(SHARDS),,$(1))

# Training and evaluation (these are the seed's settings; train.py's recipe flags go in TRAIN_FLAGS).
MODEL ?= segnet
WIDTH ?= 1.0
EPOCHS ?= 10
BATCH_SIZE ?= 16
LEARNING_RATE ?= 0.001
OPTIMIZER ?= sgd
CLASS_WEIGHTS ?= none
# Share of the training cache held back to validate each epoch (0: train on every tile).
VALIDATION ?= 0.2
# train.py --repeat-threshold: tiles holding a class found in fewer than this share of the
# tiles are drawn more often (0: off).
REPEAT_THRESHOLD ?= 0
# yes: train.py --mixed-precision (bfloat16 on CPUs that have it, float16 on GPUs).
MIXED_PRECISION ?= no
TRAIN_FLAGS ?=
WEIGHTS ?= weights.hdf5
DATA ?= data/training.hdf5
TEST_DATA ?= data/testing.hdf5
IMAGES ?=
MASKS ?=
IMG ?=
PREDICT_FLAGS ?=
# Test-time augmentation of make validate, make predict and make map: the mean of N turned and
# mirrored copies (1: none).
TTA ?= 1
OUT ?= output
# make map: the OSM source to compare the map with (none: MAP_OSM=), and more flags.
MAP_OSM ?= $(OSM)
MAP_FLAGS ?=

# The demo world: a synthetic town at 0°N 0°E with its own loopback imagery server.
# DEMO_SEED picks the town; its map and its imagery must come from the same seed.
DEMO_SEED ?= 0
DEMO_BBOX := -0.0275,-0.0275,0.0275,0.0275
DEMO_VARS := QA_TILES=demo OSM_SOURCE=qa-tiles BBOX=$(DEMO_BBOX) IMAGE_TILES=demo:$(DEMO_SEED) \
	TRAIN_SIZE=300 ZOOM_LEVEL=17 TILE_SIZE=256 MODEL=segnet-basic WIDTH=0.25 EPOCHS=35 \
	VALIDATION=0 REPEAT_THRESHOLD=0.5 BATCH_SIZE=8 OPTIMIZER=adam LEARNING_RATE=0.003 CLASS_WEIGHTS=none \
	MIXED_PRECISION=yes TTA=8

.PHONY: install demo demo-map test bench download-osm-tiles import train validate predict map preview \
	serve-demo clean clean-all

install: $(INSTALLED)

$(INSTALLED): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# --- Labels -------------------------------------------------------------------------

download-osm-tiles: $(OSM)

data/osm/demo.mbtiles: | $(INSTALLED)
	$(PY) prepare.py demo-world --out $@ --seed $(DEMO_SEED)

data/osm/%.mbtiles: | $(INSTALLED)
	$(PY) prepare.py download-osm --name $* --base-url $(QA_TILES_URL) --out-dir data/osm

data/all_tiles.txt: $(OSM_PREREQ) | $(INSTALLED)
	$(PY) prepare.py all-tiles --osm-source $(OSM_SOURCE) --osm $(OSM) --bbox=$(BBOX) \
		--classes $(CLASSES) --overpass-url $(OVERPASS_URL) --out $@

# Each tile list records how it was made (its #made-by line: OSM source, box, zoom, seed...),
# so later stages take those from the list rather than from more flags.
data/sample.txt: data/all_tiles.txt
	$(PY) prepare.py sample --all-tiles $< --zoom $(ZOOM_LEVEL) --count $(TRAIN_SIZE) --seed $(SEED) --out $@

data/labels/color: $(call UNLESS_SHARD,data/sample.txt $(CLASSES))
	$(PY) prepare.py labels --sample data/sample.txt --classes $(CLASSES) --tile-size $(TILE_SIZE) --out $@ $(SHARD_FLAG)
	touch $@

data/sample-filtered.txt: data/labels/color
	$(PY) prepare.py filter --sample data/sample.txt --labels $< --classes $(CLASSES) \
		--label-ratio $(LABEL_RATIO) --tile-size $(TILE_SIZE) --out $@ --stats data/labels/label-stats.csv

# --- Imagery ------------------------------------------------------------------------

data/images: $(call UNLESS_SHARD,data/sample-filtered.txt)
	@echo "$(PY) prepare.py images --sample data/sample-filtered.txt --out $@ $(SHARD_FLAG)" \
		"(IMAGE_TILES not echoed: it may hold a token)"
	@$(PY) prepare.py images --sample data/sample-filtered.txt --image-tiles '$(IMAGE_TILES)' --out $@ \
		--labels data/labels/color --workers $(WORKERS) $(SHARD_FLAG)
	touch $@

# Needs only the labels, so you can look before paying for imagery; images show as they arrive.
preview: data/sample-filtered.txt
	$(PY) prepare.py preview --data data --sample data/sample-filtered.txt --out data/preview.html

serve-demo: | $(INSTALLED)
	$(PY) prepare.py serve-demo --port 8765 --seed $(DEMO_SEED)

# --- Cache --------------------------------------------------------------------------

# With SHARD=I SHARDS=N this writes data/training.shard-I-of-N.hdf5 and data/testing.shard-I-of-N.hdf5
# instead; with SHARDS=N alone it merges them into these two.
data/training.hdf5 data/testing.hdf5 &: $(call UNLESS_SHARDS,data/images)
	$(PY) prepare.py $(CACHE_COMMAND) --sample data/sample-filtered.txt --images data/images \
		--labels data/labels/color --test-size $(TEST_SIZE) --test-list data/test-sample-filtered.txt \
		--out data/training.hdf5 --test-out data/testing.hdf5

# Bring your own labelled imagery: make import IMAGES=dir MASKS=dir, then
# make train validate DATA=data/mine.hdf5 TEST_DATA=data/mine-test.hdf5
import: | $(INSTALLED)
	@test -n "$(IMAGES)" -a -n "$(MASKS)" || { echo "make import needs IMAGES=<dir> MASKS=<dir>" >&2; exit 2; }
	$(PY) prepare.py import $(IMAGES) $(MASKS) --classes $(CLASSES) --tile-size $(TILE_SIZE) \
		--test-size $(TEST_SIZE) --seed $(SEED) --out data/mine.hdf5

# --- Model --------------------------------------------------------------------------

train: $(DATA)
	$(PY) train.py --data $< --weights $(WEIGHTS) --model $(MODEL) --width $(WIDTH) \
		--epochs $(EPOCHS) --batch-size $(BATCH_SIZE) --learning-rate $(LEARNING_RATE) \
		--optimizer $(OPTIMIZER) --class-weights $(CLASS_WEIGHTS) --validation $(VALIDATION) \
		--repeat-threshold $(REPEAT_THRESHOLD) --seed $(SEED) --resume \
		$(if $(filter yes,$(MIXED_PRECISION)),--mixed-precision) $(TRAIN_FLAGS)

validate: $(TEST_DATA) | $(INSTALLED)
	$(PY) validate.py --weights $(WEIGHTS) --data $< --tta $(TTA)

predict: | $(INSTALLED)
	@test -n "$(IMG)" || { echo "make predict needs IMG=<image or directory> (and OUT=<dir>)" >&2; exit 2; }
	$(PY) feed_forward.py $(WEIGHTS) $(IMG) $(OUT) --tta $(TTA) $(PREDICT_FLAGS)

# Map an area: make map BBOX=... IMAGE_TILES=... ZOOM_LEVEL=... OUT=output/area
map: | $(INSTALLED)
	@echo "$(PY) prepare.py map --weights $(WEIGHTS) --bbox=$(BBOX) --zoom $(ZOOM_LEVEL) --out $(OUT) (IMAGE_TILES not echoed)"
	@$(PY) prepare.py map --weights $(WEIGHTS) --bbox=$(BBOX) --zoom $(ZOOM_LEVEL) --image-tiles '$(IMAGE_TILES)' \
		$(if $(MAP_OSM),--osm-source $(OSM_SOURCE) --osm $(MAP_OSM)) --tile-size $(TILE_SIZE) --tta $(TTA) --out $(OUT) $(MAP_FLAGS)

# --- The two commands ---------------------------------------------------------------

demo: | $(INSTALLED)
	$(MAKE) --no-print-directory $(DEMO_VARS) data/osm/demo.mbtiles data/sample-filtered.txt \
		data/training.hdf5 train validate
	$(MAKE) --no-print-directory $(DEMO_VARS) predict OUT=output/demo \
		IMG=$$($(PY) -m osmseg.commands.report held-out-image)
	@$(PY) -m osmseg.commands.report summary --predict-out output/demo

# The whole demo town mapped with the demo's model, compared with its OSM map (after make demo).
demo-map: | $(INSTALLED)
	$(MAKE) --no-print-directory $(DEMO_VARS) map OUT=output/demo-map

test: | $(INSTALLED)
	@bash .ci/test-deps
	$(PY) -m pytest -q

# The model bench compares with PyTorch (CPU), kept out of .venv in a venv of its own.
bench/.venv/.installed: bench/requirements.txt
	$(PYTHON) -m venv bench/.venv
	bench/.venv/bin/pip install --quiet -r bench/requirements.txt
	touch $@

bench: | $(INSTALLED) bench/.venv/.installed
	$(PY) bench/run.py

clean:
	rm -rf data/all_tiles.txt data/sample.txt data/sample-filtered.txt data/test-sample-filtered.txt \
		data/labels data/images data/training.hdf5 data/testing.hdf5 data/preview.html
	rm -f weights.hdf5 weights.state.* training_log.csv training_log.png predictions.hdf5 \
		metrics.json confusion.csv confusion.png
	rm -rf output data/map-tiles

clean-all: clean
	rm -rf data/osm $(VENV)
