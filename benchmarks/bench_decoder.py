"""SAM's mask decoder over many prompts of one image: segment-anything's against the engine's.

Side by side in one run, on the same decoder weights, image embedding and prompts (random weights:
timing only), rounds interleaved, the best round of each kept:

* ``reference``: segment-anything's ``MaskDecoder.predict_masks`` (a copy of the image embedding
  per prompt, its own attention), every prompt's masks upscaled;
* ``engine``: the masks engine's decoder (``model/amg.py``: ``decoder_tokens`` then
  ``decoder_masks``; ``model/two_way.py``'s first block shared and projections folded), every
  prompt's masks upscaled; on a CPU, as the engine runs it there, a few prompts at a time
  (``cpu_decoder_tokens``, ``cpu_decoder_masks``), and ``engine_one_piece`` the whole call at once;
* ``engine_gated_S``: the same, but the masks part only for a share ``S`` of the prompts, as the
  engine does for the prompts whose predicted IoU lets a mask through (``--shares``);
* ``engine_conv_upscaling``: the engine's decoder, the whole call at once, with the upscaling as
  segment-anything's transposed convolutions (the engine before 2026-11-29), and the masks part
  alone both ways
  (``masks_part``: the matrix products of ``model/two_way.py::upscaled_mask_logits``;
  ``masks_part_conv``) on one set of transformer outputs.

Reports ms per call, prompts per second, the ratios to the reference, and how far the engine's
outputs are from the reference's (mask logits and IoU, max abs difference). On CUDA both run in
bf16 (the engine's decoder is a bf16 copy: the reference runs on the same copy) and, with
``--compile``, each compiled.

    python3 benchmarks/bench_decoder.py                                  # CPU, ~2 minutes
    python3 benchmarks/bench_decoder.py --prompts 64 --bf16              # CPU, the bf16 decoder copy
    python3 benchmarks/bench_decoder.py --device cuda --prompts 512 --compile
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from timing import best_of_interleaved

    from ssam.model.amg import (
        bf16_decoder,
        cpu_decoder_masks,
        cpu_decoder_tokens,
        decoder_masks,
        decoder_tokens,
    )
    from ssam.model.sam import build_sam
    from ssam.model.sdpa import enable_sdpa
    from ssam.model.two_way import convolution_mask_logits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sam", default="vit_b", help="any size: SAM's mask decoder is the same for all")
    p.add_argument("--prompts", type=int, default=32, help="prompts per decoder call")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shares", type=float, nargs="*", default=[0.5, 0.2])
    p.add_argument("--compile", action="store_true", help="torch.compile each variant (CUDA)")
    p.add_argument(
        "--bf16", action="store_true", help="on a CPU too, the bf16 decoder copy (what masks.cpu_bf16 runs)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()

    torch.manual_seed(0)
    dev = torch.device(args.device)
    sam = build_sam(args.sam, seed=0).to(dev).eval()
    cuda = dev.type == "cuda"
    if cuda:
        enable_sdpa(sam)  # as the engine runs it
    dec = bf16_decoder(sam) if cuda or args.bf16 else sam.mask_decoder
    dtype = dec.iou_token.weight.dtype
    n = args.prompts
    c = sam.prompt_encoder.embed_dim  # 256 for the official sizes, 32 for the smoke SAM
    feats = torch.randn(1, c, *sam.prompt_encoder.image_embedding_size, device=dev, dtype=dtype)
    coords = torch.rand(n, 1, 2, device=dev) * sam.image_encoder.img_size
    labels = torch.ones(n, 1, dtype=torch.int, device=dev)
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        pe = sam.prompt_encoder.get_dense_pe().to(dtype)
        sparse, dense = sparse.to(dtype), dense[:1].to(dtype)
    hw = tuple(feats.shape[-2:])

    def reference():
        return dec.predict_masks(feats, pe, sparse, dense.expand(n, -1, -1, -1))

    # what the engine runs on this device: on a CPU a few prompts at a time (CPU_DECODER_CHUNK_BYTES)
    run_tokens, run_masks = (
        (decoder_tokens, decoder_masks) if cuda else (cpu_decoder_tokens, cpu_decoder_masks)
    )

    def engine(share=1.0, run_tokens=run_tokens, run_masks=run_masks):
        hs, src, iou, _ = run_tokens(dec, feats, pe, sparse, dense)
        if share < 1.0:
            keep = torch.arange(0, n, max(1, round(1 / share)), device=dev)
            hs, src = hs[keep], src[keep]
        return run_masks(dec, hs, src, hw)[0], iou

    def conv_masks(hs, src):
        """The masks part as it was before 2026-11-29: segment-anything's transposed convolutions."""
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        return convolution_mask_logits(dec.output_upscaling, hyper, src, hw)

    def engine_conv_upscaling():
        hs, src, iou, _ = decoder_tokens(dec, feats, pe, sparse, dense)
        return conv_masks(hs, src), iou

    with torch.inference_mode():  # the masks part alone, on one set of transformer outputs
        hs0, src0 = decoder_tokens(dec, feats, pe, sparse, dense)[:2]
    variants = {"reference": reference, "engine": engine, "engine_conv_upscaling": engine_conv_upscaling}
    if not cuda:
        variants["engine_one_piece"] = lambda: engine(1.0, decoder_tokens, decoder_masks)
    variants.update({f"engine_gated_{s:g}": (lambda s=s: engine(s)) for s in args.shares})
    variants["masks_part"] = lambda: decoder_masks(dec, hs0, src0, hw)[0]
    variants["masks_part_conv"] = lambda: conv_masks(hs0, src0)
    if args.compile:
        variants = {k: torch.compile(f) for k, f in variants.items()}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    res.update(sam=args.sam, prompts=n, dtype=str(dtype), compiled=args.compile)
    with torch.inference_mode():
        for k, f in variants.items():  # warm-up (and compiling)
            t = time.perf_counter()
            f()
            sync()
            res[f"{k}_warm_up_s"] = time.perf_counter() - t
        ref_masks, ref_iou = variants["reference"]()
        got_masks, got_iou = variants["engine"]()
        res["masks_max_abs_diff"] = float((got_masks.float() - ref_masks.float()).abs().max())
        res["masks_mean_abs"] = float(ref_masks.float().abs().mean())
        res["iou_max_abs_diff"] = float((got_iou.float() - ref_iou.float()).abs().max())
        res["mask_pixels_same_sign"] = float(((got_masks > 0) == (ref_masks > 0)).float().mean())
        conv = variants["masks_part_conv"]()
        res["masks_part_vs_conv_max_abs_diff"] = float(
            (variants["masks_part"]().float() - conv.float()).abs().max()
        )
        del conv
        del ref_masks, got_masks
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        best = best_of_interleaved(variants, args.rounds, sync)
    for k, t in best.items():
        res[f"{k}_ms"] = t * 1e3
        res[f"{k}_prompts_per_s"] = n / t
        if not k.startswith("masks_part"):
            res[f"{k}_speedup"] = best["reference"] / t
    res["masks_part_matrices_vs_conv"] = best["masks_part_conv"] / best["masks_part"]
    res["engine_vs_engine_conv_upscaling"] = best["engine_conv_upscaling"] / best["engine"]
    if "engine_one_piece" in best:
        res["engine_vs_engine_one_piece"] = best["engine_one_piece"] / best["engine"]
    if cuda:
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
