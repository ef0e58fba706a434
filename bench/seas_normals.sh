#!/bin/bash
# What SeaS's generated normals add to the detectors: seas on wood and pill in the quality tier with 48 normals per
# product, the same dataset evaluated without them (the demo job) and with them (evaluate.synthetic_normals).
# Usage: bench/seas_normals.sh [workdir]; the two reports land in <workdir>/scores-normals-{false,true}.md.
set -e
cd "$(dirname "$0")/.."
W=${1:-runs/tier-normals}
PY=.venv/bin/python
export PYTHONPATH=src
COMMON=(--set workdir=$W --set "products=[wood,pill]" --set "methods=[seas]" --set "evaluate.baselines=[]"
  --set "evaluate.detectors=[segmenter,diffusionad]" --set "evaluate.detector_seeds={diffusionad: [0, 1, 2]}")
date
$PY -m defectsynth.cli demo --config configs/benchmark.yaml "${COMMON[@]}" --set generate.normals_per_product=48 \
  --set evaluate.synthetic_normals=false
cp $W/report/scores.md $W/scores-normals-false.md
date
$PY -m defectsynth.jobs.evaluate --config $W/config.resolved.yaml "${COMMON[@]}" --set evaluate.synthetic_normals=true
cp $W/report/scores.md $W/scores-normals-true.md
date
