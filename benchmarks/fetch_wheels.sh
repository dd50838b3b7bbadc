#!/usr/bin/env bash
# The wheels benchmarks/gpu_run.sh installs on the device machine (Python 3.12 with torch,
# torchvision, transformers, timm, pyarrow and pillow, no network): what the engines and stages
# import that it lacks, at the versions this repo's .venv has (so the GPU runs the code the tests
# ran). Writes .whl/ (kept out of git through .git/info/exclude); a call that runs gpu_run.sh
# carries it. Run here, where pip reaches the package registry:
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PKGS="segment-anything open_clip_torch ftfy wcwidth pycocotools pydantic pydantic_core annotated-types
typing-inspection typing_extensions lemminflect"
pins=()
for p in $PKGS; do
  v=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
  pins+=("$p==$v")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -l .whl
du -sh .whl
