"""Pipeline speed and memory, side by side in one run, reported as ratios.

Runs the bundled sample through the smoke pipeline, each run in a fresh process:

1. Ray Data graph vs a plain sequential loop over the same stage objects (``ray.executor=local``),
   on the same N images: wall time and the ratio.
2. Per-stage throughput (rows per second per worker) from the Ray run's summary.
3. Peak memory (RSS of the whole process tree: driver, raylet, Ray workers, img2dataset) at N and
   4N images with the Ray executor: streaming should keep the ratio near 1.

    .venv/bin/python benchmarks/bench_pipeline.py [--repeat-4n 4] [--out benchmarks/last_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys
from ssam.pipeline.config import load_config
from ssam.pipeline.run import run_pipeline
cfg = load_config(sys.argv[1], sys.argv[2:])
s = run_pipeline(cfg, log=lambda m: None)
print("RESULT " + json.dumps({"totals": s.totals, "rates": s.stage_rows_per_s, "wall_s": s.wall_s,
                              "overlap": s.overlap}))
"""


def make_input(folder: Path, copies: int) -> Path:
    """The sample's pairs, each image copied ``copies`` times under distinct names (distinct URLs)."""
    src = pq.read_table(REPO / "sample/pairs.parquet").to_pylist()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(copies):
        for r in src:
            name = Path(r["URL"].split(":", 1)[1]).name
            shutil.copy(REPO / "sample/images" / name, folder / "images" / f"{c}_{name}")
            rows.append(dict(r, URL=f"file:images/{c}_{name}"))
    path = folder / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(input_path: Path, out: Path, executor: str, address: str | None = None, env=None) -> dict:
    """One pipeline run in a fresh process; wall time and the process tree's peak RSS."""
    overrides = [f"input.path={input_path}", f"output.dir={out}", f"ray.executor={executor}"]
    if address:
        overrides.append(f"ray.address={address}")
    cmd = [sys.executable, "-c", CHILD, str(REPO / "configs/pipeline/smoke.yaml"), *overrides]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env
    )
    ps, peak, driver_peak = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        try:
            driver_peak = max(driver_peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.read().splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"run failed ({executor}, {input_path}): exit {proc.returncode}")
    result = json.loads(lines[-1][len("RESULT ") :])
    return dict(result, process_wall_s=wall, peak_rss_mb=peak / 2**20, driver_peak_rss_mb=driver_peak / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--repeat-4n", type=int, default=4, help="the large input is this many copies of the sample"
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks/last_pipeline.json"), help="JSON results file")
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="run the Ray runs on a local cluster started with `ray start` (head + 2 worker nodes, "
        "token auth); peak RSS is then the driver's alone (the nodes are not its children)",
    )
    args = ap.parse_args()
    cluster = address = env = None
    if args.cluster:
        sys.path.insert(0, str(REPO / "tests"))
        from raycluster import RayCliCluster

        cluster = RayCliCluster([{"num_cpus": 2}, {"num_cpus": 2}]).start()
        address, env = cluster.gcs_address, cluster.env
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            small, large = make_input(tmp / "n", 1), make_input(tmp / "4n", args.repeat_4n)
            ray_n = run(small, tmp / "ray_n", "ray", address, env)
            local_n = run(small, tmp / "local_n", "local")
            ray_4n = run(large, tmp / "ray_4n", "ray", address, env)
    finally:
        if cluster:
            cluster.stop()
    n = ray_n["totals"]["input_rows"]
    report = {
        "ray": "local cluster: head + 2 worker nodes (ray start)" if args.cluster else "in-process",
        "images": {"N": n, "4N": ray_4n["totals"]["input_rows"]},
        "wall_s": {
            "ray_N": ray_n["process_wall_s"],
            "local_N": local_n["process_wall_s"],
            "ray_4N": ray_4n["process_wall_s"],
        },
        "ray_over_local_speedup": local_n["process_wall_s"] / ray_n["process_wall_s"],
        "stage_rows_per_s_per_worker": ray_n["rates"],
        "peak_rss_mb": {
            "ray_N": ray_n["peak_rss_mb"],
            "ray_4N": ray_4n["peak_rss_mb"],
            "local_N": local_n["peak_rss_mb"],
        },
        "peak_rss_ratio_4N_over_N": ray_4n["peak_rss_mb"] / ray_n["peak_rss_mb"],
        "ray_4N_time_ratio": ray_4n["process_wall_s"] / ray_n["process_wall_s"],
        "driver_peak_rss_mb": {"ray_N": ray_n["driver_peak_rss_mb"], "ray_4N": ray_4n["driver_peak_rss_mb"]},
        "driver_bytes_per_output_byte": {
            "ray_N": ray_n["totals"]["driver_bytes_per_output_byte"],
            "ray_4N": ray_4n["totals"]["driver_bytes_per_output_byte"],
        },
        "seconds_to_first_shard_vs_download_end": {"ray_N": ray_n["overlap"], "ray_4N": ray_4n["overlap"]},
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"images: N={n}, 4N={report['images']['4N']} (smoke models, CPU)")
    print(
        f"pipeline wall, N: Ray {ray_n['process_wall_s']:.1f}s, sequential loop {local_n['process_wall_s']:.1f}s "
        f"-> Ray/sequential speed-up x{report['ray_over_local_speedup']:.2f}"
    )
    for stage, rate in ray_n["rates"].items():
        print(f"  {stage:<11} {rate:8.2f} rows/s per worker")
    print(
        f"peak RSS (process tree): N {ray_n['peak_rss_mb']:.0f} MB, 4N {ray_4n['peak_rss_mb']:.0f} MB "
        f"-> x{report['peak_rss_ratio_4N_over_N']:.2f} for x{args.repeat_4n} the images "
        f"(time x{report['ray_4N_time_ratio']:.2f}); sequential loop N {local_n['peak_rss_mb']:.0f} MB"
    )
    d = report["driver_peak_rss_mb"]
    print(
        f"driver peak RSS: N {d['ray_N']:.0f} MB, 4N {d['ray_4N']:.0f} MB -> x{d['ray_4N'] / d['ray_N']:.2f}"
    )
    b = report["driver_bytes_per_output_byte"]
    print(f"bytes sent to the driver per output byte: N {b['ray_N']:.5f}, 4N {b['ray_4N']:.5f}")
    o = report["seconds_to_first_shard_vs_download_end"]
    print(f"first shard written / download end (s from start): N {o['ray_N']}, 4N {o['ray_4N']}")


if __name__ == "__main__":
    main()
