#!/usr/bin/env bash
# GPU kit, step 2 (runs on the GPU machine, from the repository root):
#   bash benchmarks/gpu/run.sh PART [--smoke] [kit options]
# PART: throughput | models | extras | subset_table | autoattack | streamed |
# imported | all (see
# benchmarks/gpu/kit.py; a second 'all' on the same warm machine goes on where the
# first stopped).
# Installs the wheels carried in .gpu/wheels (benchmarks/gpu/prepare.sh) with
# --no-deps into a target directory, installs jaxdef with --no-deps beside them,
# prints versions and the GPU, then runs the part. Results: $OUT (./gpu_out when
# $OUT is unset): kit.json, kit.md, log.txt, trace.tgz and the runs' logs.
# On the CPU test (--smoke) nothing is installed unless .gpu/wheels exists.
set -uo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: run.sh PART [--smoke]}
shift
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${KIT_SITE:-/tmp/jaxdef_kit_site}
if compgen -G ".gpu/wheels/*.whl" > /dev/null && [ -z "${KIT_NO_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/wheels/*.whl || { echo "error: wheel install failed" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --upgrade --target "$SITE" . 2>&1 | grep -v "^WARNING" || true
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # Should the image's own dependencies not suit the carried flax/orbax, fall
  # back to the image's versions of those (and say so).
  if ! "$PY" -c "import flax, optax, orbax.checkpoint, chex, ml_collections" 2>>"$OUT/log.txt"; then
    echo "carried flax/optax/orbax/chex do not import here; using the image's" | tee -a "$OUT/log.txt"
    rm -rf "$SITE"/flax* "$SITE"/optax* "$SITE"/orbax* "$SITE"/chex*
  fi
fi
# The kit process allocates as it goes, up to 40% of the GPU memory: the PyTorch
# twin runs in the same process, and the subset runs (separate processes) need
# the rest. (The first H200 run preallocated 40% and left the subset runs 12% each.)
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false \
  XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.4}
# Compiled programs persist across calls on a warm machine (a rerun resumes faster),
# torch.compile's (Inductor's FX graphs, kernels and autotuning) too.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/gpu_work/jax_cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/gpu_work/inductor_cache}
{
  echo "== $(date -u '+%F %T UTC') run.sh $PART $*"
  # Python, package versions and the device are the kit's first record.
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
} 2>&1 | tee -a "$OUT/log.txt"
"$PY" -m benchmarks.gpu.kit "$PART" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
