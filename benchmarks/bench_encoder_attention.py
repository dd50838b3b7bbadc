"""SAM's image encoder with segment-anything's attention against PyTorch's SDPA (``model/sdpa.py``).

The masks engine switches the model it runs to ``F.scaled_dot_product_attention`` on every device.
Here two copies of one random-weight encoder (``--sam``) encode the same ``--images`` random
1024 x 1024 inputs, taking turns for ``--rounds`` rounds, each keeping its best: float32, and bf16
as the engine runs its encoder (autocast; ``masks.cpu_bf16`` on a CPU, the default on CUDA).
Reports seconds per call, the ratio and how far apart the features are.

A third copy, ``folded``, is an experiment, not what the engine ships: the decomposed relative
positions folded into the queries and keys (each query gets its ``h + w`` relative-position
scores as extra channels, each key the one-hot of its row and column; the values are padded with
zeros to the same width), so that SDPA needs no mask. On CUDA that lets the flash kernel run
instead of the memory-efficient one that a float mask forces; on a CPU it was no faster
(benchmarks/README.md, 2026-11-29).

    .venv/bin/python benchmarks/bench_encoder_attention.py                    # CPU, vit_b, ~2 minutes
    .venv/bin/python benchmarks/bench_encoder_attention.py --device cuda --sam vit_h --images 8
"""

from __future__ import annotations

import argparse
import copy
import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from timing import best_of_interleaved

from ssam.device import bf16_autocast
from ssam.model.sam import build_sam
from ssam.model.sdpa import enable_sdpa, rel_pos_terms


def folded_rel_pos_forward(self: EncoderAttention, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's encoder attention through a mask-free SDPA call (module docstring)."""
    b, h, w, _ = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, h*w, head_dim)
    c = q.shape[-1]
    if not self.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    else:
        rel_h, rel_w = rel_pos_terms(q.reshape(b * self.num_heads, h * w, c), self, h, w)
        rel_h = rel_h.reshape(b, self.num_heads, h * w, h).to(q.dtype)
        rel_w = rel_w.reshape(b, self.num_heads, h * w, w).to(q.dtype)
        rows = torch.eye(h, dtype=q.dtype, device=q.device).repeat_interleave(w, 0)  # key (r, c) -> e_r
        cols = torch.eye(w, dtype=q.dtype, device=q.device).repeat(h, 1)  # key (r, c) -> e_c
        q2 = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
        k2 = torch.cat(
            [k, rows.expand(b, self.num_heads, -1, -1), cols.expand(b, self.num_heads, -1, -1)], -1
        )
        out = F.scaled_dot_product_attention(q2, k2, F.pad(v, (0, h + w)), scale=1.0)[..., :c]
    out = out.reshape(b, self.num_heads, h, w, c).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


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
    folded = copy.deepcopy(theirs)
    for m in folded.modules():
        if isinstance(m, EncoderAttention):
            m.forward = types.MethodType(folded_rel_pos_forward, m)
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
            a, b, f = theirs(x).float(), ours(x).float(), folded(x).float()
            res[f"{name}_features_max_abs_diff"] = float((a - b).abs().max())
            res[f"{name}_folded_features_max_abs_diff"] = float((a - f).abs().max())
            res[f"{name}_features_mean_abs"] = float(a.abs().mean())
            del a, b, f
            variants = {
                "segment_anything": lambda: theirs(x),
                "sdpa": lambda: ours(x),
                "folded": lambda: folded(x),
            }
            best = best_of_interleaved(variants, args.rounds, sync)
        for k, t in best.items():
            res[f"{name}_{k}_s"] = t
        res[f"{name}_ratio"] = best["segment_anything"] / best["sdpa"]
        res[f"{name}_folded_vs_sdpa"] = best["sdpa"] / best["folded"]
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
