"""Run the shipped labels stage four times on three photos with 48 masks each and print, as JSON,
the minor page faults of the last run, those of re-filling a 48 MiB buffer, whether freed memory is
kept, and a digest of the rows.

Run in its own process (``test_engines.py``): the allocator setting is process-wide, so each
setting needs a fresh interpreter (``SSAM_KEEP_FREED_MEMORY=0`` turns it off).
Usage: ``python labels_page_faults.py CONFIG``.
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import sys

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data

from ssam.device import keep_freed_memory
from ssam.pipeline.config import load_config
from ssam.stages.labels import LabelStage


def rows_with_ellipses(masks_per_image: int = 48) -> dict[str, list]:
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {k: [] for k in ("key", "jpeg", "status", "fail_stage", "fail_detail")}
    rows["candidates_json"], rows["annotations_json"] = [], []
    cands = json.dumps([{"label": c, "source": "caption"} for c in ("cat", "cup", "person")])
    for i, img in enumerate((data.astronaut(), data.coffee(), data.chelsea())):
        im = Image.fromarray(img)
        im.thumbnail((320, 320))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        w, h = im.size
        yy, xx = np.mgrid[:h, :w]
        anns = []
        for j in range(masks_per_image):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(0.03, 0.3) * w, rng.uniform(0.03, 0.3) * h
            m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(m))
            seg = {"size": [h, w], "counts": rle["counts"].decode()}
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            anns.append({"id": j, "segmentation": seg, "bbox": bbox, "area": int(m.sum())})
        for key, value in (
            ("key", f"{i:04d}"),
            ("jpeg", buf.getvalue()),
            ("status", "ok"),
            ("fail_stage", ""),
            ("fail_detail", ""),
            ("candidates_json", cands),
            ("annotations_json", json.dumps(anns)),
        ):
            rows[key].append(value)
    return rows


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def buffer_faults(mib: int = 48) -> int:
    """Page faults of filling a fresh ``mib`` MiB tensor, after two such tensors were freed.

    glibc's default serves a block over 32 MiB (its highest automatic mmap threshold) with fresh
    pages every time; with freed memory kept it reuses the heap's pages.
    """
    for _ in range(2):
        torch.empty(mib << 18).fill_(1.0)
    before = minor_faults()
    torch.empty(mib << 18).fill_(1.0)
    return minor_faults() - before


def main() -> None:
    cfg = load_config(sys.argv[1], ["output.dir=/tmp/unused"])
    stage = LabelStage(cfg.labels, cfg.seed)
    rows = rows_with_ellipses()
    for _ in range(3):  # the heap settles
        stage(dict(rows))
    before = minor_faults()
    out = stage(dict(rows))
    faults = minor_faults() - before
    digest = hashlib.sha256("".join(out["annotations_json"]).encode()).hexdigest()
    buffers = buffer_faults()  # before anything here could call keep_freed_memory: the stage's call counts
    result = {"kept": keep_freed_memory(), "faults": faults, "buffer_faults": buffers}
    print(json.dumps({**result, "status": out["status"], "rows": digest}))


if __name__ == "__main__":
    main()
