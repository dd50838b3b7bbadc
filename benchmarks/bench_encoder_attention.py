"""SAM's image encoder with segment-anything's attention against PyTorch's SDPA (``model/sdpa.py``).

The masks engine switches the model it runs to ``F.scaled_dot_product_attention`` on every device.
Here two copies of one random-weight encoder (``--sam``) encode the same ``--images`` random
1024 x 1024 inputs, taking turns for ``--rounds`` rounds, each keeping its best: float32, and bf16
as the engine runs its encoder (autocast; ``masks.cpu_bf16`` on a CPU, the default on CUDA).
Reports seconds per call, the ratio and how far apart the features are.

    .venv/bin/python benchmarks/bench_encoder_attention.py                    # CPU, vit_b, ~2 minutes
    .venv/bin/python benchmarks/bench_encoder_attention.py --device cuda --sam vit_h --images 8
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from timing import best_of_interleaved

from ssam.device import bf16_autocast
from ssam.model.sam import build_sam
from ssam.model.sdpa import enable_sdpa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sam", default="vit_b")
    p.add_argument("--images", type=int, default=1, help="inputs per encoder call")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    dev = torch.device(args.device)
    theirs = build_sam(args.sam, seed=0).to(dev).eval().image_encoder
    ours = copy.deepcopy(theirs)
    switched = enable_sdpa(ours)
    side = theirs.img_size
    x = torch.randn(args.images, 3, side, side, generator=torch.Generator().manual_seed(0)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    res.update(
        sam=args.sam, images=args.images, attention_modules_switched=switched, threads=torch.get_num_threads()
    )
    for name, bf16 in (("float32", False), ("bf16", True)):
        with torch.inference_mode(), bf16_autocast(dev, bf16):
            a, b = theirs(x).float(), ours(x).float()
            res[f"{name}_features_max_abs_diff"] = float((a - b).abs().max())
            res[f"{name}_features_mean_abs"] = float(a.abs().mean())
            del a, b
            best = best_of_interleaved(
                {"segment_anything": lambda: theirs(x), "sdpa": lambda: ours(x)}, args.rounds, sync
            )
        res[f"{name}_segment_anything_s"] = best["segment_anything"]
        res[f"{name}_sdpa_s"] = best["sdpa"]
        res[f"{name}_ratio"] = best["segment_anything"] / best["sdpa"]
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
