#!/usr/bin/env bash
# A 2-worker Ray Train run of ssam-train (smoke config, synthetic shapes) on the device machine,
# which has no Ray: it travels as .raypack/ (built here by benchmarks/pack_ray.sh; carry .raypack).
# Run from the repo root after gpu_run.sh's package setup (/tmp/site holds the .whl wheels,
# /tmp/pkg/ssam is put together), or as gpu_run.sh's step 6:
#   EXTRA_ARGS="--gpus-per-worker 0.5" bash benchmarks/gpu_ray_train.sh
# On one GPU two workers that each ask for a whole GPU are never scheduled (the run waits until the
# timeout), hence --gpus-per-worker 0.5 (DDP then runs over gloo: NCCL refuses two ranks on one card).
# Prints the trainer's last metrics and its steady-state samples/s (TensorBoard event times).
set -uo pipefail
exec 2>&1

EXTRA_ARGS=${EXTRA_ARGS:-}
STEPS=${STEPS:-30}
TIMEOUT=${TIMEOUT:-150}
# a CPU dry run elsewhere: PY=/path/python3.12 SITE=... PKG=... WORK=... GPU_FLAG= RAY_STOP=0 bash benchmarks/gpu_ray_train.sh
PY=${PY:-python3} SITE=${SITE:-/tmp/site} PKG=${PKG:-/tmp/pkg} GPU_FLAG=${GPU_FLAG---use-gpu}

REPO=$(cd "$(dirname "$0")/.." && pwd)
PACKS="$REPO/.raypack"
WORK=${WORK:-/tmp/raytrain-run}
[[ -d $PKG/ssam ]] || { echo "FATAL: $PKG/ssam missing (run gpu_run.sh's package setup first)"; exit 1; }
[[ -f $PACKS/ray.tar.xz ]] || { echo "FATAL: $PACKS/ray.tar.xz missing (bash benchmarks/pack_ray.sh here, carry .raypack)"; exit 1; }

t0=$(date +%s)
mkdir -p "$SITE"
tar -xJf "$PACKS/ray.tar.xz" -C "$SITE" || { echo "FATAL: unpacking ray.tar.xz"; exit 1; }
tar -xJf "$PACKS/deps.tar.xz" -C "$SITE" || { echo "FATAL: unpacking deps.tar.xz"; exit 1; }
echo "packs unpacked in $(( $(date +%s) - t0 )) s"

export PYTHONPATH=$PKG:$SITE PYTHONUNBUFFERED=1 SSAM_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # single node: Ray binds/advertises 127.0.0.1 (no network here)
export RAY_USAGE_STATS_ENABLED=0
cd /tmp  # the repo's own ssam/ folder would shadow $PKG/ssam

"$PY" -c "import ray, ray.train.torch, torch; print('ray', ray.__version__, ray.__file__, '| torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" || exit 1

rm -rf "$WORK" && mkdir -p "$WORK"
"$PY" -c "
from ssam.model.synthetic import write_shapes
print('shards:', len(write_shapes('$WORK/shards', images=64, per_shard=16, seed=0, emb_dim=32)))" || exit 1

echo "=== ssam-train smoke, --num-workers 2 $GPU_FLAG, $STEPS steps, EXTRA_ARGS='$EXTRA_ARGS'"
t1=$(date +%s.%N)
# shellcheck disable=SC2086
timeout -k 10 "$TIMEOUT" "$PY" -c "
import sys
from ssam.model.cli import train_main
sys.exit(train_main(sys.argv[1:]))" "$REPO/configs/train/smoke.yaml" --shards "$WORK/shards" --output "$WORK/out" \
    --num-workers 2 $GPU_FLAG --set train.max_steps="$STEPS" --set train.log_every=5 \
    --set train.checkpoint_every=1000 --set train.calibration_images=0 $EXTRA_ARGS 2>&1 \
    | grep --line-buffered -v -e 'PlacementGroupCleaner' -e 'Reporting training result'
rc=${PIPESTATUS[0]}
wall=$("$PY" -c "import time; print(round(time.time() - $t1, 1))")
echo "=== train rc=$rc (124 = timed out after ${TIMEOUT}s) wall=${wall}s"
# `ray stop` kills EVERY Ray process on the machine: fine on the lent GPU box, set RAY_STOP=0 on shared ones
[[ ${RAY_STOP:-1} == 1 ]] && "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1  # leftovers after a timeout

# Throughput from the TensorBoard event wall times (rank 0 logs every 5 steps; excludes startup).
"$PY" - "$WORK/out" "$wall" <<'EOF'
import glob, json, sys
from pathlib import Path
out, wall = Path(sys.argv[1]), float(sys.argv[2])
m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
if not m:
    print("no metrics.jsonl: training did not log a step"); sys.exit(0)
print("last metrics:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m[-1].items()})
rate_keys = [k for k in m[-1] if k != "bad_samples" and any(s in k for s in ("per_s", "samples", "images_s", "throughput"))]
for k in rate_keys:
    print(f"trainer-logged {k}: {[r.get(k) for r in m]}")
batch, world = None, 2
for ck in (out / "model.pt", out / "checkpoints/last.pt"):
    try:
        from ssam.model.semantic_sam import read_checkpoint
        batch = read_checkpoint(ck)["train_config"]["train"]["batch_size"]; break
    except Exception:
        pass
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tb")); ea.Reload()
    ev = ea.Scalars("train/loss")
    if len(ev) >= 2:
        steps, secs = ev[-1].step - ev[0].step, ev[-1].wall_time - ev[0].wall_time
        msg = f"steady state: steps {ev[0].step}->{ev[-1].step} in {secs:.2f}s = {steps / secs:.2f} steps/s"
        if batch:
            msg += f" = {steps * batch * world / secs:.1f} samples/s (batch {batch}/worker x {world} workers)"
        print(msg)
except Exception as e:
    print("no TensorBoard timing:", type(e).__name__, e)
last = m[-1]["step"]
print(f"whole run incl. Ray start and model build: {last} steps in {wall}s"
      + (f" = {last * batch * world / wall:.1f} samples/s" if batch else ""))
EOF
exit "$rc"
