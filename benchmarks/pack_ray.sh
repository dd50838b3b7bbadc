#!/usr/bin/env bash
# Ray for the device machine (Python 3.12, x86-64, no network, no Ray), small enough to travel:
# its wheel (79 MB) is over the 64 MiB a device call can carry. Writes .raypack/ray.tar.xz
# (Ray 2.60.0 without what ray.init() and Ray Train never import, binaries stripped; ~17 MiB) and
# .raypack/deps.tar.xz (the pure-Python needs the machine lacks; <1 MiB). Run here, once:
#   bash benchmarks/pack_ray.sh          then: benchmarks/gpu_ray_train.sh on the device machine
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=$REPO/.raypack
WORK=$(mktemp -d /tmp/pack-ray.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
grep -qx '/.raypack/' "$REPO/.git/info/exclude" || echo '/.raypack/' >>"$REPO/.git/info/exclude"
mkdir -p "$DEST" "$WORK/ray" "$WORK/deps"

# cp312 manylinux wheels; the device machine already has numpy, pandas, pyarrow, msgpack, protobuf,
# click, pyyaml, requests, filelock, packaging, aiohttp, grpcio, psutil (and pydantic travels in
# .whl/), so only jsonschema and its parts are added
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$WORK/dl" ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1

unzip -q "$WORK"/dl/ray-*.whl -d "$WORK/ray"
for w in "$WORK"/dl/*.whl; do [[ $w == */ray-* ]] || unzip -q "$w" -d "$WORK/deps"; done

# Not imported by ray.init() or ray.train.torch: Java jars, RLlib, Serve, the LLM libraries, the
# dashboard's web client, Tune's examples, source maps. Kept: dashboard/modules (ray.train imports
# its pydantic models), the runtime-env agent's own aiohttp, pynvml (GPU detection).
R=$WORK/ray/ray
rm -rf "$R/jars" "$R/rllib" "$R/serve" "$R/llm" "$R/dashboard/client" "$R/tune/examples"
find "$WORK" -name '*.map' -delete
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
# debug symbols: raylet 35 -> 23 MB, gcs_server 41 -> 29 MB, _raylet.so 44 -> 32 MB
find "$R" -type f | while read -r f; do
    if file -b "$f" | grep -q '^ELF'; then strip --strip-unneeded "$f"; fi
done

XZ_OPT=-9e tar -C "$WORK/ray" -cJf "$DEST/ray.tar.xz" .
XZ_OPT=-9e tar -C "$WORK/deps" -cJf "$DEST/deps.tar.xz" .
ls -l "$DEST"/*.tar.xz
