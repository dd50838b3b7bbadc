"""Automatic masks for several images at once: SAM's point-grid recipe, run on the device.

One engine for the masks stage and ``ssam-predict``'s automatic mode. Its results follow
segment-anything's ``SamAutomaticMaskGenerator(output_mode="coco_rle")``: the same settings and
defaults, the same filters in the same order (predicted IoU on the low-res output, stability on
the upscaled logits, crop-edge boxes, box NMS per crop, NMS between crops, small-region cleanup),
built from its helpers. What differs is where and how often the work happens:

* the prompts of all images and crops of a call share mask-decoder calls (``points_per_batch``
  prompts each), each prompt with its own image embedding (model/two_way.py regroups the
  decoder's transformer for that);
* the decoder's masks part (upscaling, hypernetwork product) runs only for prompts with a mask
  that passes the predicted-IoU filter, which reads the output tokens alone;
* only the masks that pass the predicted-IoU filter are upscaled; stability, boxes and crop-edge
  filtering are computed on the device, chunk by chunk, keeping only the survivors' low-res
  logits; NMS runs once per call for all images (one category per crop, then per image);
* only the masks that survive NMS are upscaled again and run-length encoded, on the device, and
  leave it as run counts in one transfer.

Added on top: ``min_mask_area`` (empty and degenerate masks are dropped before NMS, so they
suppress no other mask), ``max_masks``, the semantic embedding and score of each mask for a
Semantic-SAM, and CUDA out-of-memory halving.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch.profiler import record_function
from torchvision.ops import batched_nms

from ssam.device import CompiledOrEager, bf16_autocast, use_bf16
from ssam.oom import Failed, run_halving_on_oom
from ssam.overlay import decode_rles

from .sdpa import enable_sdpa
from .two_way import image_tokens, two_way_forward, upscaled_mask_logits


@dataclass(frozen=True)
class AmgSettings:
    """Automatic-mask settings. Defaults are ``SamAutomaticMaskGenerator``'s, plus our own four."""

    points_per_side: int | None = 32  # grid points per side of each crop; None: use point_grids
    points_per_batch: int = 64  # prompts per mask-decoder call, across images and crops (GPU: 256-1024)
    pred_iou_thresh: float = 0.88  # keep masks whose predicted IoU is above this (0: no filter)
    stability_score_thresh: float = 0.95  # keep masks whose stability score is at least this (0: no filter)
    stability_score_offset: float = 1.0  # logit shift of the two cutoffs the stability score compares
    box_nms_thresh: float = 0.7  # box IoU above which NMS drops the lower-IoU mask within a crop
    crop_n_layers: int = 0  # extra crop layers; layer i has (2**i)**2 crops, each one encoded
    crop_nms_thresh: float = 0.7  # box IoU for NMS between crops (the mask from the smaller crop wins)
    crop_overlap_ratio: float = 512 / 1500  # crop overlap in the first layer, as a fraction of the short side
    crop_n_points_downscale_factor: int = 1  # layer i samples points_per_side / factor**i points per side
    point_grids: Sequence[np.ndarray] | None = (
        None  # explicit Nx2 grids in [0,1], one per crop layer (kept as tuples)
    )
    min_mask_region_area: int = 0  # fill holes, drop islands smaller than this (pixels; OpenCV on the CPU)
    min_mask_area: int = 16  # ours: drop masks with fewer pixels (empty, degenerate); 0 keeps them
    max_masks: int = 256  # ours: masks kept per image, highest predicted IoU first
    encoder_batch_size: int = 4  # images or crops per image-encoder forward
    bf16: bool = True  # CUDA: encoder under bf16 autocast, mask decoder in bf16
    cpu_bf16: bool = False  # the same on a CPU with AVX512-BF16 or AMX (ssam.device.use_bf16)
    compile_encoder: bool = True  # torch.compile the image encoder on CUDA (ignored elsewhere)
    compile_decoder: bool = True  # torch.compile the prompt-batched mask decoder on CUDA (ignored elsewhere)

    def __post_init__(self):
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError("set exactly one of points_per_side and point_grids")
        if self.point_grids is not None and len(self.point_grids) != self.crop_n_layers + 1:
            raise ValueError(f"point_grids needs {self.crop_n_layers + 1} grids (crop_n_layers + 1)")
        if min(self.points_per_batch, self.encoder_batch_size, self.max_masks) < 1:
            raise ValueError("points_per_batch, encoder_batch_size and max_masks must be at least 1")
        if self.point_grids is not None:  # tuples: settings compare and hash by value
            grids = tuple(
                tuple((float(x), float(y)) for x, y in np.asarray(g, float)) for g in self.point_grids
            )
            object.__setattr__(self, "point_grids", grids)


@dataclass
class ImageMasks:
    """One image's automatic masks, highest predicted IoU first; arrays are aligned with records."""

    records: list[dict]  # SA-1B fields: segmentation (COCO RLE), bbox XYWH, area, predicted_iou, ...
    semantic: np.ndarray | None = None  # NxD unit embeddings of each mask's output (Semantic-SAM only)
    score: np.ndarray | None = None  # N predicted cosine scores (Semantic-SAM only)
    masks: np.ndarray | None = None  # NxHxW bool, when generate(return_masks=True)
    failure: str | None = None  # "gpu_oom": out of GPU memory even alone (records are then empty)


def resize_image(image_hwc: np.ndarray, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """An ``H x W x 3`` uint8 image resized to ``hw`` on ``device``: ``1 x 3 x h x w`` float32 of
    whole numbers 0..255.

    The same filter as segment-anything's ``ResizeLongestSide.apply_image`` (PIL bilinear with
    antialiasing), done by torch where the image goes: on a CPU torch's uint8 kernel, which uses
    PIL's fixed-point arithmetic (measured: the same pixels but for a few one level off, and
    x1.1-3.4 faster than PIL plus the upload, benchmarks/README.md); on CUDA the original uint8
    pixels are uploaded from pinned memory without waiting and resized there, so the host neither
    resizes nor waits for the copy.
    """
    if image_hwc.ndim != 3 or image_hwc.shape[2] != 3 or image_hwc.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {image_hwc.shape} {image_hwc.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(image_hwc) if image_hwc.flags.writeable else image_hwc.copy())
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif t.device != device:
        t = t.to(device)
    t = t.permute(2, 0, 1)[None]
    if tuple(hw) == tuple(t.shape[-2:]):
        return t.float()
    if t.device.type == "cpu":  # the uint8 kernel rounds and clamps as PIL does
        return F.interpolate(t, size=tuple(hw), mode="bilinear", antialias=True, align_corners=False).float()
    # Float kernels elsewhere: rounded and clamped back to the uint8 image PIL would have made.
    out = F.interpolate(t.float(), size=tuple(hw), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def resize_longest_side(image_hwc: np.ndarray, target: int, device: torch.device) -> torch.Tensor:
    """:func:`resize_image` to SAM's input size: the longest side ``target``, as
    ``ResizeLongestSide.apply_image`` (its rounding of the other side too)."""
    hw = ResizeLongestSide.get_preprocess_shape(image_hwc.shape[0], image_hwc.shape[1], target)
    return resize_image(image_hwc, hw, device)


def boxes_and_areas(binary_bhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each mask's box, as segment-anything's ``batched_mask_to_box`` gives it (XYXY, inclusive
    right and bottom, zeros for an empty mask), and its area, both int64.

    From one pass over the pixels for row counts (int16 sums along rows, as segment-anything's
    stability score counts: x2.8-9.4 faster on a CPU than one int32 sum over both axes) and one for
    column flags; the rows' counts give both the area and the rows' extent.
    """
    b, h, w = binary_bhw.shape
    if binary_bhw.numel() == 0:
        zeros = torch.zeros(b, dtype=torch.long, device=binary_bhw.device)
        return torch.zeros(b, 4, dtype=torch.long, device=binary_bhw.device), zeros
    rows = binary_bhw.sum(-1, dtype=torch.int16 if w < 2**15 else torch.int32)  # B x H pixel counts
    area = rows.sum(-1, dtype=torch.int64)
    rows, cols = rows > 0, binary_bhw.any(-2)

    def extent(flags: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        at = torch.arange(n, device=flags.device)
        return torch.where(flags, at, n).amin(-1), torch.where(flags, at, -1).amax(-1)

    (top, bottom), (left, right) = extent(rows, h), extent(cols, w)
    boxes = torch.stack([left, top, right, bottom], -1)
    return boxes * (area > 0)[:, None], area


def upscale_logits(
    low_bhw: torch.Tensor, img_size: int, input_hw: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """Low-res mask logits ``B x m x m`` upscaled to the image: segment-anything's
    ``Sam.postprocess_masks`` (bilinear to ``img_size`` squared, cropped to the resized input
    ``input_hw``, bilinear to the image's ``out_hw``) with less work. segment-anything and torch
    have no such shortcut, so it is written here.

    * The first step only computes the input's rows and columns: the low-res logits are cut to the
      rows and columns those read (one spare) and resized by the same whole factor, which gives
      the same source positions and weights, so the same values, bit for bit. The second step is
      skipped where it would keep the size (an image stored at SAM's input side, as the
      pipeline's decode stores large ones): torch makes it a copy.
    * On a CPU, where the image's size differs from the input's and the product is cheap for the
      pixels the bilinear steps write (mostly images smaller than the model's input, whose first
      step writes a large intermediate that is mostly thrown away), both steps are one small
      matrix per axis, ``A_h @ low @ A_w^T``, built by passing the identity through the same two
      resizes: equal to rounding (~1e-6 of a logit). Not on CUDA, where it is not measured.
    """
    n_h, n_w = input_hw
    o_h, o_w = out_hw
    m = low_bhw.shape[-1]
    if low_bhw.shape[-2] != m or img_size % m or n_h > img_size or n_w > img_size:
        x = F.interpolate(low_bhw[:, None], (img_size, img_size), mode="bilinear", align_corners=False)
        return F.interpolate(x[..., :n_h, :n_w], out_hw, mode="bilinear", align_corners=False)[:, 0]
    if _separable_pays(low_bhw, m, input_hw, out_hw):
        return separable_upscale(low_bhw, img_size, input_hw, out_hw)
    f = img_size // m
    # Output row y < n reads low-res rows floor((y + 0.5) / f - 0.5) and the one after it.
    r_h, r_w = min(m, -(-n_h // f) + 1), min(m, -(-n_w // f) + 1)
    x = low_bhw[:, None, :r_h, :r_w]
    x = F.interpolate(x, (r_h * f, r_w * f), mode="bilinear", align_corners=False)[..., :n_h, :n_w]
    if (o_h, o_w) != (n_h, n_w):
        x = F.interpolate(x, out_hw, mode="bilinear", align_corners=False)
    return x[:, 0]


#: the separable product is used when its multiply-adds are at most this many times the pixels the
#: two bilinear steps write: on a CPU the two break even near 150 (a 683x1024 image from SAM's
#: 1024 input is 160, 600x800 is 128; benchmarks/README.md)
SEPARABLE_MACS_PER_PIXEL = 140


def _separable_pays(low_bhw, m, input_hw, out_hw) -> bool:
    """Whether :func:`upscale_logits` takes the separable product (float32 on a CPU, a size change)."""
    if low_bhw.device.type != "cpu" or low_bhw.dtype != torch.float32:
        return False
    (n_h, n_w), (o_h, o_w) = input_hw, out_hw
    if (o_h, o_w) == (n_h, n_w):
        return False
    macs = min(o_h, o_w) * m * m + o_h * m * o_w
    return macs <= SEPARABLE_MACS_PER_PIXEL * (n_h * n_w + o_h * o_w)


def separable_upscale(
    low_bhw: torch.Tensor, img_size: int, input_hw: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """:func:`upscale_logits` as ``A_h @ low @ A_w^T`` (float32, any device; benchmarks compare)."""
    m = low_bhw.shape[-1]
    a_h = _axis_matrix(m, img_size, input_hw[0], out_hw[0], low_bhw.device)
    a_w = _axis_matrix(m, img_size, input_hw[1], out_hw[1], low_bhw.device)
    if out_hw[0] <= out_hw[1]:  # the cheaper order: the shorter output side first
        return torch.matmul(torch.matmul(a_h, low_bhw), a_w.T)
    return torch.matmul(a_h, torch.matmul(low_bhw, a_w.T))


@functools.lru_cache(maxsize=256)  # one per image size in a long run: bounded (each is o x m floats)
def _axis_matrix(m: int, size: int, n: int, o: int, device: torch.device) -> torch.Tensor:
    """``o x m``: one axis of :func:`upscale_logits`'s two bilinear steps as a matrix (each step
    is separable, the same linear weights per axis), made once per shape."""
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, whichever mode asks first
        eye = torch.eye(m, dtype=torch.float32)[:, None]  # m signals, one low-res pixel each
        a = F.interpolate(eye, size=size, mode="linear", align_corners=False)[..., :n]
        a = F.interpolate(a, size=o, mode="linear", align_corners=False)[:, 0]
        return a.T.contiguous().to(device)


@torch.inference_mode()
def sam_image_features(
    model: Sam, images: Sequence[np.ndarray], batch_size: int, bf16: bool, encoder=None
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Image-encoder features ``1xCxhxw`` (float32) and resized input size ``(h, w)`` of each HxWx3
    uint8 RGB image, ``batch_size`` images per forward (``encoder``: e.g. a compiled one), under
    bf16 autocast when ``bf16`` (as ``ssam.device.use_bf16`` decided for the model's device)."""
    # `is None`, not `or`: a compiled module has no truth value (its __len__ raises)
    size = model.image_encoder.img_size
    encoder = model.image_encoder if encoder is None else encoder
    out = []
    for a in range(0, len(images), batch_size):
        resized = [resize_longest_side(im, size, model.device) for im in images[a : a + batch_size]]
        with bf16_autocast(model.device, bf16):
            feats = encoder(torch.cat([model.preprocess(t) for t in resized])).float()
        out += [(f, tuple(t.shape[-2:])) for f, t in zip(feats.split(1), resized, strict=True)]
    return out


def bf16_decoder(model: Sam) -> torch.nn.Module:
    """A bf16 copy of ``model``'s mask decoder, weights and activations, for inference.

    Under autocast the decoder's residual stream, norms and upscaling stay in float32 and every
    weight is cast on every call. With thousands of prompts per call the decoder is bound by
    memory traffic over ``P x 4096 x 256`` image tokens, so running it wholly in bf16 halves its
    bytes (as segment-anything-fast does). A copy, so the model itself keeps its float32 weights;
    it is a snapshot: build it again after the weights change.
    """
    return copy.deepcopy(model.mask_decoder).to(torch.bfloat16)


def decode_prompts(
    model: Sam,
    features: torch.Tensor,
    coords_pn2: torch.Tensor,
    labels_pn: torch.Tensor,
    decoder: torch.nn.Module | None = None,
    run=None,
):
    """All mask-decoder outputs for P point prompts, each with its own image embedding.

    Args:
        model: a ``Sam`` or ``SemanticSam``.
        features: ``PxCxhxw`` (the image embedding of each prompt) or ``1xCxhxw`` (shared).
        coords_pn2, labels_pn: points in the model's input frame and their labels.
        decoder: the mask decoder to run (default ``model.mask_decoder``), e.g. a
            :func:`bf16_decoder`: its inputs are cast to its dtype.
        run: what runs it (default :func:`run_decoder`; the engine may pass a compiled one).

    Returns:
        masks ``Px4xhxw`` low-res logits, iou ``Px4``, semantic ``Px4xD`` and score ``Px4``
        (both None for a plain SAM), in the decoder's dtype; output 0 is the single-mask one,
        1..3 the multimask ones.
    """
    sparse, dense = model.prompt_encoder(points=(coords_pn2, labels_pn), boxes=None, masks=None)
    dense = dense[:1]  # the no-mask embedding, the same for every prompt (P rows only as a broadcast)
    pe, dec = model.prompt_encoder.get_dense_pe(), decoder or model.mask_decoder
    dtype = dec.iou_token.weight.dtype  # each cast, as a caller's autocast may have made any of them bf16
    sparse, dense, pe, features = (x.to(dtype) for x in (sparse, dense, pe, features))
    return (run or run_decoder)(dec, features, pe, sparse, dense)


def run_decoder(dec, features, pe, sparse, dense):
    """The mask decoder over P prompts' embeddings: ``decode_prompts`` after the prompt encoder."""
    hs, src, iou, score = decoder_tokens(dec, features, pe, sparse, dense)
    masks, semantic = decoder_masks(dec, hs, src, tuple(features.shape[-2:]))
    return masks, iou, semantic, score


def decoder_tokens(dec, features, pe, sparse, dense):
    """The decoder's first part, for P prompts: its transformer and the heads that read only the
    output tokens. Returns the output tokens ``P x N x C``, image tokens ``P x hw x C``, predicted
    IoU ``P x 4`` and, for a Semantic-SAM, predicted cosine ``P x 4`` (else None)."""
    if hasattr(dec, "predict_all"):
        hs, src = dec.run_transformer(features, pe, sparse, dense)
        return hs, src, *dec.scores(hs)
    # MaskDecoder.predict_masks by hand: it repeat_interleaves one image embedding per call, while
    # here each prompt brings its own (or a shared one broadcasts).
    p = sparse.shape[0]
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight]).unsqueeze(0).expand(p, -1, -1)
    tokens = torch.cat([tokens, sparse], dim=1)
    hs, src = two_way_forward(dec.transformer, image_tokens(features, dense), pe, tokens)
    return hs, src, dec.iou_prediction_head(hs[:, 0]), None


def decoder_masks(dec, hs, src, hw):
    """The decoder's second part, for the prompts of :func:`decoder_tokens`' outputs (or some of
    them): the upscaling and the hypernetwork product (``hw``: the image embedding's size). Returns
    low-res mask logits ``P x 4 x 4h x 4w`` and, for a Semantic-SAM, semantic embeddings ``P x 4 x D``
    (else None)."""
    if hasattr(dec, "predict_all"):
        return dec.masks_and_semantic(hs, src, hw)
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    return upscaled_mask_logits(dec.output_upscaling, hyper, src, hw), None


# On a CPU a decoder call's per-prompt tensors (each prompt's 4096 x 256 image tokens, its 65536 x
# 32 upscaled channels) outgrow the caches when it holds dozens of prompts: every elementwise
# pass then reads and writes main memory. Run a few prompts at a time, each part's largest
# per-prompt tensors fit in about this many bytes and are still cached when the next operation
# reads them (vit_b's decoder, 64 prompts on 2 cores with a 32 MiB L3: the whole call x1.2 in
# float32 and x1.4 in bf16 in bench_decoder.py; benchmarks/README.md has the sweep that chose the
# budget). On CUDA the whole call runs at once, as its kernels want.
CPU_DECODER_CHUNK_BYTES = 16 * 2**20


def _upscaled_bytes_per_prompt(dec, src: torch.Tensor) -> int:
    """Bytes of one prompt's upscaled channels (the masks part's largest tensor)."""
    up = dec.output_upscaling
    channels = up[-2].out_channels if isinstance(up, torch.nn.Sequential) else src.shape[2] // 8
    return 16 * src.shape[1] * channels * src.element_size()


def _in_prompt_chunks(fn, per_prompt_bytes: int, n: int, *args):
    """``fn(*args)`` over ``n`` prompts, a chunk at a time: the tensor arguments with ``n`` rows
    are sliced (the shared ones have one row, and ``n`` is at least 2 once there are chunks),
    outputs concatenated (None stays None)."""
    k = max(1, CPU_DECODER_CHUNK_BYTES // max(1, per_prompt_bytes))
    if n <= k:
        return fn(*args)
    parts = [
        fn(*[a[i : i + k] if isinstance(a, torch.Tensor) and a.shape[0] == n else a for a in args])
        for i in range(0, n, k)
    ]
    return tuple(None if outs[0] is None else torch.cat(outs) for outs in zip(*parts, strict=True))


def cpu_decoder_tokens(dec, features, pe, sparse, dense):
    """:func:`decoder_tokens` a few prompts at a time (see ``CPU_DECODER_CHUNK_BYTES``)."""
    per = features[0].nelement() * features.element_size()  # one prompt's image tokens
    return _in_prompt_chunks(decoder_tokens, per, sparse.shape[0], dec, features, pe, sparse, dense)


def cpu_decoder_masks(dec, hs, src, hw):
    """:func:`decoder_masks` a few prompts at a time (see ``CPU_DECODER_CHUNK_BYTES``)."""
    per = _upscaled_bytes_per_prompt(dec, src)
    return _in_prompt_chunks(decoder_masks, per, src.shape[0], dec, hs, src, hw)


def rle_runs(masks_bhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO run lengths of B masks, on their device, without a loop over masks (written by hand).

    Returns:
        runs ``R`` (int64; mask i's runs follow mask i-1's, zeros first, as COCO counts) and
        lengths ``B`` (runs per mask).
    """
    b, h, w = masks_bhw.shape
    cols = masks_bhw.transpose(1, 2)  # B x W x H view: COCO's column-major order, without a copy
    # change[i, x, y]: pixel (y, x) starts a run (differs from the pixel before it; pixel -1 counts as 0)
    change = torch.empty_like(cols, memory_format=torch.contiguous_format)
    change[:, :, 1:] = cols[:, :, 1:] != cols[:, :, :-1]
    change[:, 1:, 0] = cols[:, 1:, 0] != cols[:, :-1, -1]
    change[:, 0, 0] = cols[:, 0, 0]
    ids, x, y = change.nonzero(as_tuple=True)
    k = torch.bincount(ids, minlength=b)
    # Each mask's run bounds [0, starts..., h*w] side by side; start g of mask i lands at g + 2i + 1.
    ends = torch.cumsum(k + 2, 0) - 1
    bounds = torch.zeros(len(ids) + 2 * b, dtype=torch.int64, device=cols.device)
    bounds[ends] = h * w
    bounds[torch.arange(len(ids), device=cols.device) + 2 * ids + 1] = x * h + y
    keep = torch.ones(max(len(bounds) - 1, 0), dtype=torch.bool, device=cols.device)
    keep[ends[:-1]] = False  # the step from one mask's h*w to the next mask's 0
    return bounds.diff()[keep], k + 1


def take_runs(runs: torch.Tensor, lengths_b: torch.Tensor, index_k: torch.Tensor):
    """The runs of masks ``index_k`` out of :func:`rle_runs`' output: (runs, lengths ``K``)."""
    first = torch.cumsum(lengths_b, 0) - lengths_b
    sel = lengths_b[index_k]
    total = int(sel.sum())
    shift = torch.repeat_interleave(first[index_k] - (torch.cumsum(sel, 0) - sel), sel, output_size=total)
    return runs[shift + torch.arange(total, device=runs.device)], sel


def coco_rles(runs: np.ndarray, lengths: np.ndarray, h: int, w: int) -> list[dict]:
    """Compressed COCO RLEs ``{"size": [h, w], "counts": str}`` from run lengths."""
    if len(lengths) == 0:
        return []
    counts = np.split(np.asarray(runs, np.uint32), np.cumsum(lengths)[:-1])
    rles = mask_utils.frPyObjects([{"size": [h, w], "counts": c} for c in counts], h, w)
    return [{"size": [h, w], "counts": r["counts"].decode()} for r in rles]


def masks_to_coco_rles(masks_bhw: torch.Tensor) -> list[dict]:
    """Compressed COCO RLEs of B masks: runs on the device, one transfer, encoded on the CPU."""
    runs, lengths = rle_runs(masks_bhw)
    both = torch.cat([lengths, runs]).cpu().numpy()
    return coco_rles(both[len(lengths) :], both[: len(lengths)], *masks_bhw.shape[1:])


def top_k_per_group(order: torch.Tensor, score: torch.Tensor, group: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``order`` restricted to the ``k`` highest ``score`` per ``group``, grouped, best first."""
    order = order[score[order].argsort(descending=True, stable=True)]
    order = order[group[order].argsort(stable=True)]
    counts = torch.bincount(group[order])
    rank = torch.arange(len(order), device=order.device) - (torch.cumsum(counts, 0) - counts)[group[order]]
    return order[rank < k]


class MaskEngine:
    """Automatic masks for batches of images with one SAM or Semantic-SAM, on the model's device.

    The masks stage: ``results = engine.generate(images, engine.encode(images))`` (or features
    from its own batched encoder). ``ssam-predict``: ``engine.generate([image], [features],
    return_masks=True)[0]`` for masks, IoU (records), semantic embeddings and scores.
    """

    def __init__(self, model: Sam, settings: AmgSettings | None = None):
        self.model, self.s = model, settings or AmgSettings()
        s = self.s
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        if s.points_per_side is not None:
            n, layers, factor = s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor
            self.grids = build_all_layer_point_grids(n, layers, factor)
        else:
            self.grids = [np.asarray(g, float) for g in s.point_grids]
        if s.min_mask_region_area > 0:
            import cv2  # noqa: F401 -- remove_small_regions needs it: fail now, not after the model ran
        self.semantic = hasattr(model.mask_decoder, "predict_all")
        cuda = self.device.type == "cuda"
        # PyTorch's fused attention for this model instance only (see model/sdpa.py): flash or
        # memory-efficient kernels on CUDA; on a CPU its flash kernel never writes the encoder's
        # 4096 x 4096 attention matrices of the global blocks (vit_b's encoder x1.3 in float32)
        enable_sdpa(model)
        self.encoder = CompiledOrEager(model.image_encoder, s.compile_encoder and cuda, "the image encoder")
        self.bf16 = use_bf16(self.device, s.bf16, s.cpu_bf16)
        # The engine's decoder: a bf16 snapshot (see bf16_decoder), else the model's own.
        self.decoder = bf16_decoder(model) if self.bf16 else model.mask_decoder
        # Compiling fuses the decoder's many elementwise passes over P x 4096 image tokens (adds of
        # positional encodings, residuals, norms, GELUs); the last chunk's other size compiles once
        # more. Two parts: the masks part runs only for the prompts whose predicted IoU lets a mask
        # through (its batch size varies: one graph with a dynamic batch size, see CompiledOrEager).
        compile_decoder = s.compile_decoder and cuda
        cpu = self.device.type == "cpu"  # a few prompts at a time (CPU_DECODER_CHUNK_BYTES)
        self.run_tokens = CompiledOrEager(
            cpu_decoder_tokens if cpu else decoder_tokens, compile_decoder, "the mask decoder's transformer"
        )
        self.run_masks = CompiledOrEager(
            cpu_decoder_masks if cpu else decoder_masks,
            compile_decoder,
            "the mask decoder's upscaling",
            dynamic_batch=True,
        )
        # False: upscale every prompt's masks, as segment-anything does (benchmarks compare)
        self.gate_masks = True

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _decode(self, features, coords, labels):
        """:func:`decoder_tokens` after the prompt encoder, with the engine's decoder (compiled, or
        eager once compiling failed): output and image tokens, predicted IoU and cosine."""
        return decode_prompts(self.model, features, coords, labels, self.decoder, self.run_tokens)

    def encode(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Image-encoder features ``1xCxhxw`` (float32) of HxWx3 uint8 RGB images, batched."""
        return [
            f
            for f, _ in sam_image_features(
                self.model, images, self.s.encoder_batch_size, self.bf16, self.encoder
            )
        ]

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[np.ndarray],
        features: Sequence[torch.Tensor | None] | None = None,
        return_masks: bool = False,
    ) -> list[ImageMasks]:
        """Automatic masks of several images, decoded together.

        Args:
            images: HxWx3 uint8 RGB arrays, any sizes.
            features: optional ``1xCxhxw`` whole-image features from :meth:`encode` (or the same
                encoder elsewhere), one per image, None to encode that one here. Crops are
                always encoded here.
            return_masks: also return ``NxHxW`` bool masks.

        Returns:
            One :class:`ImageMasks` per image, in order. All images are processed as one group;
            on CUDA out-of-memory the group is halved and retried, and an image that runs out
            of memory alone gets ``failure="gpu_oom"`` and no records.
        """
        if features is not None and len(features) != len(images):
            raise ValueError(f"{len(features)} features for {len(images)} images")
        feats = list(features) if features is not None else [None] * len(images)
        results = run_halving_on_oom(
            lambda ix: self._generate_group([images[i] for i in ix], [feats[i] for i in ix], return_masks),
            range(len(images)),
        )
        return [ImageMasks([], failure=r.reason) if isinstance(r, Failed) else r for r in results]

    def _generate_group(self, images, features, return_masks) -> list[ImageMasks]:
        s, dev = self.s, self.device
        jobs = []  # (image, crop box XYXY, layer): one per crop of every image
        for i, im in enumerate(images):
            boxes, layers = generate_crop_boxes(im.shape[:2], s.crop_n_layers, s.crop_overlap_ratio)
            jobs += [(i, box, layer) for box, layer in zip(boxes, layers, strict=True)]
        feats = [features[i] if layer == 0 else None for i, _, layer in jobs]
        todo = [j for j, f in enumerate(feats) if f is None]
        crops = [images[i][y0:y1, x0:x1] for i, (x0, y0, x1, y1), _ in (jobs[j] for j in todo)]
        with record_function("amg.encode"):
            encoded = self.encode(crops)
        for j, f in zip(todo, encoded, strict=True):
            feats[j] = f
        dtype = self.decoder.iou_token.weight.dtype
        feats_jchw = torch.cat([f.reshape(1, *f.shape[-3:]).to(dev, dtype) for f in feats])

        coords, points, prompt_job = [], [], []
        for j, (_, (x0, y0, x1, y1), layer) in enumerate(jobs):
            pts = self.grids[layer] * np.array([[x1 - x0, y1 - y0]])
            coords.append(self.transform.apply_coords(pts, (y1 - y0, x1 - x0)))
            points.append(pts + np.array([[x0, y0]]))
            prompt_job.append(np.full(len(pts), j))
        coords_t = torch.as_tensor(np.concatenate(coords), device=dev)  # float64 as in the generator
        points, prompt_job = np.concatenate(points), np.concatenate(prompt_job)
        prompt_job_t = torch.as_tensor(prompt_job, device=dev)

        parts = []
        dim = self.model.config.clip_dim if self.semantic else 0
        # Semantic-SAM trained here: its IoU calibration, applied here, or after the stability score
        # is known when it weighs that too (then the IoU threshold waits for it as well)
        calibration = getattr(self.model, "iou_calibration", None)
        late = calibration if calibration is not None and calibration.uses_stability else None
        early = calibration if late is None else None
        iou_filter = s.pred_iou_thresh > 0 and late is None  # as the generator: 0 keeps negative ones too
        gate = self.gate_masks and iou_filter
        hw = tuple(feats_jchw.shape[-2:])
        for a in range(0, len(points), s.points_per_batch):
            b = min(a + s.points_per_batch, len(points))
            first, last = int(prompt_job[a]), int(prompt_job[b - 1])
            f = feats_jchw[first : first + 1] if first == last else feats_jchw[prompt_job_t[a:b]]
            labels = torch.ones(b - a, 1, dtype=torch.int, device=dev)
            with record_function("amg.decode"):  # no autocast: the decoder has its own dtype
                hs, src, iou, score = self._decode(f, coords_t[a:b, None], labels)
            # The three multimask outputs, flattened prompt-major like the generator's.
            k = iou.shape[1] - 1
            iou = iou[:, 1:].float().flatten()
            if early is not None:  # thresholds, NMS and records see the calibrated IoU
                iou = early.apply(iou)
            prompt = torch.arange(a, b, device=dev).repeat_interleave(k)
            ok = torch.ones_like(iou, dtype=torch.bool)
            if iou_filter:
                ok = iou > s.pred_iou_thresh
            # Masks (the decoder's upscaling and hypernetwork product: 30-40% of its time per prompt
            # on a CPU, bench_decoder.py) only for the prompts with a mask the IoU filter keeps: the
            # others' masks would be dropped unseen. `row` maps a flat mask index to its decoded row.
            row = None
            if gate:
                need = ok.view(-1, k).any(1).nonzero()[:, 0]
                if len(need) == 0:
                    continue
                if len(need) < b - a:
                    row = torch.full((b - a,), -1, dtype=torch.long, device=dev)
                    row[need] = torch.arange(len(need), device=dev)
                    hs, src = hs[need], src[need]
            with record_function("amg.decode"):
                masks, semantic = self.run_masks(self.decoder, hs, src, hw)
            low = masks[:, 1:].float().flatten(0, 1)
            if self.semantic:
                semantic, score = semantic[:, 1:].float().flatten(0, 1), score[:, 1:].float().flatten()
            for j in range(first, last + 1):
                # At most points_per_batch masks upscaled at once: a third of the generator's peak.
                for idx in (ok & (prompt_job_t[prompt] == j)).nonzero()[:, 0].split(s.points_per_batch):
                    r = idx if row is None else row[idx // k] * k + idx % k
                    extras = [semantic[r], score[idx]] if self.semantic else []
                    with record_function("amg.survivors"):
                        parts.append(
                            self._survivors(images, jobs, j, low[r], iou[idx], prompt[idx], extras, late)
                        )
        if not parts:
            return [
                self._image_result(im.shape[:2], [], {}, jobs, points, return_masks, dim) for im in images
            ]
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        cat["job"] = prompt_job_t[cat["prompt"]]
        with record_function("amg.select"):
            return self._select(images, jobs, cat, points, return_masks, dim)

    def _upscale(self, crop_box, low_bhw) -> torch.Tensor:
        """Low-res logits of a crop's masks upscaled to the crop's pixels, as the generator does."""
        x0, y0, x1, y1 = crop_box
        crop_hw = (y1 - y0, x1 - x0)
        input_hw = self.transform.get_preprocess_shape(*crop_hw, self.transform.target_length)
        return upscale_logits(low_bhw, self.model.image_encoder.img_size, input_hw, crop_hw)

    def _survivors(
        self, images, jobs, j, low_bhw, iou, prompt, extras, calibration=None
    ) -> dict[str, torch.Tensor]:
        """Upscale one crop's IoU survivors; keep the stable, inner, big-enough ones (with a
        ``calibration`` that weighs stability: calibrate the IoU and apply its threshold here).

        Only their low-res logits are kept: the few that survive NMS are upscaled once more
        for their RLEs (:meth:`_rles`), so no run lengths are computed for masks NMS drops.
        """
        s, thr = self.s, self.model.mask_threshold
        i, box, _ = jobs[j]
        h, w = images[i].shape[:2]
        logits = self._upscale(box, low_bhw)
        stability = calculate_stability_score(logits, thr, s.stability_score_offset)
        keep = None
        if s.stability_score_thresh > 0:  # as the generator: a NaN score (empty mask) passes a 0 threshold
            keep = stability >= s.stability_score_thresh
        if calibration is not None:
            iou = calibration.apply(iou, stability)
            if s.pred_iou_thresh > 0:
                keep = iou > s.pred_iou_thresh if keep is None else keep & (iou > s.pred_iou_thresh)
        if keep is not None:
            ok = keep.nonzero()[:, 0]
            binary, iou, stability, prompt = (logits > thr)[ok], iou[ok], stability[ok], prompt[ok]
            low_bhw, extras = low_bhw[ok], [x[ok] for x in extras]
        else:
            binary = logits > thr
        boxes, area = boxes_and_areas(binary)
        ok = ~is_box_near_crop_edge(boxes, box, [0, 0, w, h]) & (area >= s.min_mask_area)
        out = dict(low=low_bhw[ok], iou=iou[ok], stability=stability[ok], area=area[ok])
        out.update(boxes=uncrop_boxes_xyxy(boxes[ok], box), prompt=prompt[ok])
        if extras:
            out["semantic"], out["score"] = extras[0][ok], extras[1][ok]
        return out

    def _rles(self, images, jobs, cat, keep) -> tuple[torch.Tensor, torch.Tensor]:
        """Run lengths of masks ``keep`` (in that order): upscaled again, crop by crop, in chunks."""
        s, thr = self.s, self.model.mask_threshold
        job = cat["job"][keep]
        by_job = job.argsort(stable=True)
        kept, kept_job = keep[by_job], job[by_job]
        runs, lengths = [], []
        for j in torch.unique_consecutive(kept_job).tolist():
            i, box, _ = jobs[j]
            h, w = images[i].shape[:2]
            for idx in kept[kept_job == j].split(s.points_per_batch):
                binary = self._upscale(box, cat["low"][idx]) > thr
                r, n = rle_runs(uncrop_masks(binary, box, h, w))
                runs.append(r)
                lengths.append(n)
        if not runs:
            empty = torch.zeros(0, dtype=torch.int64, device=keep.device)
            return empty, empty
        # Computed in job order; take_runs puts them back in keep's order.
        return take_runs(torch.cat(runs), torch.cat(lengths), by_job.argsort())

    def _select(self, images, jobs, cat, points, return_masks, dim) -> list[ImageMasks]:
        """NMS over the whole group, then one transfer of the survivors; records on the CPU."""
        s, dev = self.s, self.device
        job, iou = cat["job"], cat["iou"]
        job_image = torch.as_tensor([i for i, _, _ in jobs], device=dev)
        job_area = torch.as_tensor([float((b[2] - b[0]) * (b[3] - b[1])) for _, b, _ in jobs], device=dev)
        image, boxes = job_image[job], cat["boxes"].float()
        keep = batched_nms(boxes, iou, job, s.box_nms_thresh)  # within each crop
        if s.crop_n_layers > 0:  # between the crops of an image, the smaller crop's mask first
            keep = keep[batched_nms(boxes[keep], 1 / job_area[job[keep]], image[keep], s.crop_nms_thresh)]
        # The generator's order after its NMS (small crops, crop order, predicted IoU), which the
        # small-region NMS breaks its ties by; grouped by image.
        for key, descending in ((iou, True), (job, False), (job_area[job], False), (image, False)):
            keep = keep[key[keep].argsort(descending=descending, stable=True)]
        if s.min_mask_region_area == 0:  # masks change no more: only the kept leave the device
            keep = top_k_per_group(keep, iou, image, s.max_masks)
        runs, lengths = self._rles(images, jobs, cat, keep)
        rle = torch.cat([lengths, runs]).cpu().numpy()
        ints = [image[keep], job[keep], cat["prompt"][keep], cat["area"][keep]]
        ints = torch.cat([torch.stack(ints, 1), cat["boxes"][keep]], 1).cpu().numpy()
        floats = [iou[keep, None], cat["stability"][keep, None]]
        if self.semantic:
            floats += [cat["score"][keep, None], cat["semantic"][keep]]
        floats = torch.cat(floats, 1).cpu().numpy()
        lengths, runs = rle[: len(keep)], rle[len(keep) :]
        run_end = np.cumsum(lengths)
        results = []
        for i, im in enumerate(images):
            lo, hi = np.searchsorted(ints[:, 0], [i, i + 1])
            r0, r1 = (run_end[lo - 1] if lo else 0), (run_end[hi - 1] if hi else 0)
            rles = coco_rles(runs[r0:r1], lengths[lo:hi], *im.shape[:2])
            rows = dict(job=ints[lo:hi, 1], prompt=ints[lo:hi, 2], area=ints[lo:hi, 3], boxes=ints[lo:hi, 4:])
            rows.update(iou=floats[lo:hi, 0], stability=floats[lo:hi, 1])
            if self.semantic:
                rows["score"], rows["semantic"] = floats[lo:hi, 2], floats[lo:hi, 3:]
            results.append(self._image_result(im.shape[:2], rles, rows, jobs, points, return_masks, dim))
        return results

    def _small_regions(self, rles: list[dict], rows: dict[str, np.ndarray]) -> np.ndarray:
        """The generator's postprocess_small_regions on one image: updates rles/rows, returns what NMS keeps."""
        a = self.s.min_mask_region_area
        changed = {}
        for k, rle in enumerate(rles):
            m, holes = remove_small_regions(mask_utils.decode(rle).astype(bool), a, mode="holes")
            m, islands = remove_small_regions(m, a, mode="islands")
            if holes or islands:
                changed[k] = m
        boxes = torch.as_tensor(rows["boxes"]).clone()
        if changed:
            boxes[list(changed)] = batched_mask_to_box(torch.as_tensor(np.stack(list(changed.values()))))
        unchanged = torch.ones(len(rles))
        unchanged[list(changed)] = 0.0  # NMS prefers masks that needed no cleanup
        thresh = max(self.s.box_nms_thresh, self.s.crop_nms_thresh)
        keep = batched_nms(boxes.float(), unchanged, torch.zeros(len(rles)), thresh).numpy()
        for k in (k for k in keep if k in changed):
            m = changed[k]
            counts = mask_utils.encode(np.asfortranarray(m, np.uint8))["counts"].decode()
            rles[k] = {"size": list(m.shape), "counts": counts}
            rows["area"][k], rows["boxes"][k] = int(m.sum()), boxes[k].numpy()
        return keep

    def _image_result(self, hw, rles, rows, jobs, points, return_masks, dim) -> ImageMasks:
        s, h, w = self.s, *hw
        keep = np.arange(len(rles))
        if rles and s.min_mask_region_area > 0:
            keep = self._small_regions(rles, rows)
            keep = keep[rows["area"][keep] >= s.min_mask_area]
        if rles:
            keep = keep[np.argsort(-rows["iou"][keep], kind="stable")][: s.max_masks]
        records = []
        for k in keep:
            (x0, y0, x1, y1), (c0, d0, c1, d1) = rows["boxes"][k], jobs[rows["job"][k]][1]
            record = {"segmentation": rles[k], "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            record.update(area=int(rows["area"][k]), predicted_iou=float(rows["iou"][k]))
            record.update(stability_score=float(rows["stability"][k]))
            record.update(point_coords=[[float(v) for v in points[rows["prompt"][k]]]])
            record.update(crop_box=[float(c0), float(d0), float(c1 - c0), float(d1 - d0)])
            records.append(record)
        out = ImageMasks(records)
        if self.semantic:
            out.semantic = rows["semantic"][keep] if rles else np.zeros((0, dim), np.float32)
            out.score = rows["score"][keep] if rles else np.zeros(0, np.float32)
        if return_masks:
            out.masks = decode_rles([r["segmentation"] for r in records], h, w).astype(bool)
        return out
