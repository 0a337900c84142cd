#!/usr/bin/env bash
# GPU kit, step 1 (runs on the CPU machine, with the package index):
#   bash benchmarks/gpu/prepare.sh
# Fills the git-ignored folder .gpu/ with what the borrowed GPU machine lacks,
# since it has no network:
#   .gpu/wheels/  pure-Python wheels for its Python 3.12 / x86-64, pinned to the
#                 versions jaxdef was tested with on jax 0.11.2 (the image has jax,
#                 jaxlib and the CUDA 13 plugin; it lacks ml-collections,
#                 pyautoattack, torchattacks, safetensors and RobustBench's
#                 architectures (the imported part), and its flax/optax/orbax/chex are
#                 of unknown versions, so the tested ones travel too;
#                 tensorflow-datasets is imported only by TFDS data sources,
#                 which the kit does not use, so it stays behind);
#   .gpu/data/    the CIFAR-10 subset (data/ is git-ignored and does not travel).
# pyautoattack's wheel ships 45 MB of example weights; they are dropped from the
# copy (the attacks never read them) so the whole kit stays under the 64 MiB
# that may travel. Prints the carry list at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.gpu
SUBSET=${SUBSET:-data/cifar10_subset.npz}
WHEELS=(ml-collections==1.1.0 pyautoattack==0.2.0 torchattacks==3.5.1
        flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92
        safetensors==0.8.0 robustbench==1.1.1)

mkdir -p "$KIT/wheels" "$KIT/data"
grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
rm -f "$KIT"/wheels/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$KIT/wheels" "${WHEELS[@]}"
python3 - "$KIT"/wheels/pyautoattack-*.whl <<'PY'
import sys, zipfile, os
path = sys.argv[1]
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
  for info in src.infolist():
    if "/examples/" in info.filename:
      continue
    data = src.read(info.filename)
    if info.filename.endswith("/RECORD"):
      data = b"".join(l + b"\n" for l in data.splitlines() if b"/examples/" not in l)
    dst.writestr(info, data)
os.replace(slim, path)
PY
if [ -f "$SUBSET" ]; then
  cp "$SUBSET" "$KIT/data/cifar10_subset.npz"
else
  echo "note: $SUBSET not found; the autoattack and subset_table parts will skip" >&2
fi
du -sh "$KIT"/wheels "$KIT"/data
echo "carry: [\"$KIT\"]"
