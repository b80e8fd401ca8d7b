#!/usr/bin/env bash
# The GPU checks still pending (issues 3, 4 and 10), one stage per device call (each well inside the 10-minute limit).
#
# Here, once:  sh benchmarks/gpu/fetch_wheels.sh && bash benchmarks/gpu/run_pending.sh stage-data
# Device call: command "bash benchmarks/gpu/run_pending.sh STAGE", carry [".whl", ".gpu_data"]
#   STAGE = check     imports, CUDA visible, versions (seconds)
#           tests     the CUDA-only tests (so400m preprocessing fidelity) and the encode-engine tests on the GPU
#           encode    benchmarks/bench_encode.py at ConceptCLIP size: (a) encoder only, (b) engine (a cohort of about
#                     20 s at the encoder's speed), (c) naive, host RSS
#           mil-io    benchmarks/bench_mil_io.py at the issue's full size, page cache dropped (goal: ratio <= 1.2)
#           concepts  benchmarks/bench_concept_scoring.py (issue 10): scoring rate / plain read rate on the device
#                     machine's disk and 16 cores (goal >= 0.8; 300 slides x 10,000 tiles x 1152 x 100 concepts)
# RUN_PENDING_DEVICE=cpu rehearses every stage on a CPU at small sizes (no figure from it is a GPU result).
# Results land in $OUT (the device tool copies them back); copy them into benchmarks/results/ and RESULTS.md.
set -euo pipefail
STAGE=${1:?usage: run_pending.sh check|tests|encode|mil-io|concepts|stage-data}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"

if [ "$STAGE" = stage-data ]; then  # here: the slide the encode benchmark reads, in a folder git ignores
  grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo '/.gpu_data/' >> .git/info/exclude
  mkdir -p .gpu_data/slides
  cp "${WSI_SHARED_DATA:-$REPO/../shared/data}/slides/cmu-1-small-region.svs" .gpu_data/slides/
  exit 0
fi

OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-$REPO/.whl}
PY=${PYTHON:-python3}
DEVICE=${RUN_PENDING_DEVICE:-cuda}
if [ ! -f "$SITE/.wsi_ready" ]; then  # the carried wheels, then this project itself (so its version is recorded)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" .
  touch "$SITE/.wsi_ready"
fi
export PYTHONPATH="$SITE" WSI_SHARED_DATA="$REPO/.gpu_data" WSI_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd /tmp  # import wsi_pipeline from $SITE (the installed copy), not from the source tree
log="$OUT/$STAGE.log"
case "$STAGE" in
  check)
    $PY -c "import torch, zarr, openslide, tiffslide, pydantic, wsi_pipeline, wsi_pipeline.mil.engine, \
wsi_pipeline.encode.engine; print('wsi_pipeline', wsi_pipeline.__version__, 'torch', torch.__version__, \
'zarr', zarr.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() \
if torch.cuda.is_available() else '')" 2>&1 | tee "$log" ;;
  tests)
    $PY -m pytest -q -p no:cacheprovider "$REPO/tests/test_encoders_preprocess.py" "$REPO/tests/test_encode_engine.py" \
      "$REPO/tests/test_mil_train.py" 2>&1 | tee "$log" ;;
  encode)
    $PY "$REPO/benchmarks/bench_encode.py" --device "$DEVICE" --cohort-seconds 20 2>&1 | tee "$log" ;;
  mil-io)
    size="--bags 1000 --tiles 10000 --memory-bags 200 --drop-caches"
    [ "$DEVICE" = cpu ] && size="--bags 20 --tiles 1000"
    # shellcheck disable=SC2086
    $PY "$REPO/benchmarks/bench_mil_io.py" $size --epochs 1 --loader-threads 8 --threads 4 --device "$DEVICE" \
      --workdir /tmp --out "$OUT/mil_io_$DEVICE.json" 2>&1 | tee "$log" ;;
  concepts)
    size="--slides 300 --tiles 10000"
    [ "$DEVICE" = cpu ] && size="--slides 10 --tiles 2000"
    # shellcheck disable=SC2086
    $PY "$REPO/benchmarks/bench_concept_scoring.py" $size --concepts 100 --rounds 2 --workdir /tmp/concept_bench \
      --name "concept_scoring_$DEVICE" 2>&1 | tee "$log" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
