#!/bin/sh
# Run HERE (with PyPI access), in the repo root: downloads the wheels the GPU machine lacks into .whl/ (ignored by
# git via .git/info/exclude), for its Python (default 3.12). The machine's image already has torch, timm,
# transformers, numpy, scipy, pandas, scikit-learn/-image, OpenCV, h5py, tifffile, pillow, typer, rich, safetensors.
# Then pass carry=[".whl"] to the device run and start its command with benchmarks/gpu/run_pending.sh (see there).
set -eu
PY=${1:-3.12}
PKGS="zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
openslide-python==1.4.7 openslide-bin==4.0.1.2 tiffslide==3.0.1 imagecodecs==2026.3.6
pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
lifelines==0.30.3 autograd==1.9.1 dask==2026.8.0 partd==1.4.2 locket==1.0.0"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
DEST=${2:-.whl}
mkdir -p "$DEST"
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 \
    --platform any -d "$DEST" "$p" || { echo "no $PY wheel for $p"; exit 1; }
done
# autograd-gamma (for lifelines) is published as source only: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" autograd-gamma==0.5.0
du -sh "$DEST"
