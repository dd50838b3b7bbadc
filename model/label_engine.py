"""Batched label engine: CLIP embeddings of SAM mask crops, cut and resampled with tensor ops.

The reference path (``stages/labels.py``) cuts each mask's padded box on the CPU with PIL, dims or
blurs the background outside the mask, runs open_clip's eval transform on the crop and CLIP image
by image. Here all the masks of a batch of images are handled with a few tensor ops:

1. the region the reference finally shows -- the part of the padded, clipped box that survives
   open_clip's ``Resize(shortest side) + CenterCrop`` -- is computed exactly (``center_square``);
2. its masks' RLE strings are parsed to run lengths on the host (``coco_counts``; no pixel is
   decoded there);
3. the crops are resampled to ``S x S`` with ``roi_align``'s sampling (bilinear samples averaged
   per output bin), in one of two ways (``image_mask_crops``):

   - on a GPU (``roi_align_crops``): the image goes to the device once as uint8, the masks are
     built there from where their runs end (``masks_from_counts``), and
     ``torchvision.ops.roi_align`` resamples the image and the masks for every mask at once; the
     background is applied to the small crops (``compose_crops``);
   - on a CPU (``window_crops``), where torchvision's roi_align runs sample by sample on one
     thread: each mask's window of the image is cut with its mask built inside the window only
     (``window_masks``), the background applied at full resolution as the reference does, and the
     windows resampled rows then columns, each output row or column a weighted sum of a few input
     ones (``separable_resample``, with ``embedding_bag``: roi_align's sampling, to float rounding);

4. CLIP's normalisation, then the crops of all images are fed to the image encoder
   ``batch_size`` at a time, crops of different images mixed, optionally under bf16 autocast on
   CUDA.

Differences from the reference, all bounded in ``tests/model/test_label_engine.py``:
resampling is roi_align's bilinear bin averaging instead of PIL's antialiased bicubic; on a GPU the
mask is resampled separately from the image (see ``compose_crops``); ``"blur"`` blurs the whole
image, not the crop, so near the crop's edges it sees the true neighbours where PIL repeats the
edge pixels. That last one is a change of behaviour, not just of rounding, for crops not much
larger than the blur (sigma 8 px by default): there PIL's blur of the crop alone is nearly the
crop's mean colour, the whole-image blur is the colour of the surroundings. With many ~10 px masks
it lowered the smallest crop-embedding cosine to the reference to 0.988 (smoke CLIP) and 0.95
(random-weight ViT-L-14), where ``"dim"`` stayed >= 0.997.

Written by hand here (no library has them): the replica of torchvision's Resize/CenterCrop
geometry as a box (``center_square``), the separable Gaussian blur (torchvision's
``gaussian_blur`` convolves with the full 2-D kernel, ~k/2 times the work for a k-tap kernel),
masks built from run lengths (``masks_from_counts``, ``window_masks``; pycocotools decodes only
whole masks), roi_align's sampling as per-axis taps run through ``embedding_bag``
(``roi_axis_taps``, ``separable_resample``; torchvision has no faster CPU kernel) and the
re-chunking of per-image crop tensors into fixed-size encoder batches (``rebatch``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import CenterCrop, Normalize, Resize

from ssam.io import atomic_path
from ssam.overlay import coco_counts

from .clip import DEFAULT_TEMPLATES, ClipBundle, encode_images, encode_texts

BACKGROUNDS = ("dim", "blur", "none")
GROUPS_PER_OCTAVE = 2  # window-size groups per doubling (separable_resample)
WINDOW_CROPS_AT_ONCE = 256  # CPU: masks of consecutive images cut together (embed_mask_crops)
# ... and at most this many bytes of crops: under the 64 MiB that keep_freed_memory has glibc
# reuse, so each call's crop buffer is recycled instead of faulted in (x1.45 for 224 px crops)
WINDOW_CROP_BYTES_AT_ONCE = 32 << 20
WINDOW_PIXELS_AT_ONCE = 1 << 22  # CPU: window pixels resampled in one call (~32 bytes each at most)


# ---------------------------------------------------------------------------------------------
# What the bundle's eval transform does


@dataclass(frozen=True)
class CropSpec:
    """The geometry and normalisation of a CLIP's eval transform.

    Attributes:
        size: side ``S`` of the square CLIP input.
        resize_mode: ``"shortest"`` (Resize shortest side to S, CenterCrop S) or ``"squash"``
            (Resize both sides to S).
        mean: per-channel mean of the Normalize step, for pixels in [0, 1].
        std: per-channel std of the Normalize step.
    """

    size: int
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def crop_spec(bundle: ClipBundle) -> CropSpec:
    """Read size, resize mode and mean/std off ``bundle.preprocess`` (an open_clip eval Compose).

    Raises:
        ValueError: a transform this engine cannot reproduce (open_clip's ``"longest"`` mode with
            padding, a non-square ``shortest`` target, or no Normalize).
    """
    steps = list(getattr(bundle.preprocess, "transforms", []))
    resize = next((t for t in steps if isinstance(t, Resize)), None)
    crop = next((t for t in steps if isinstance(t, CenterCrop)), None)
    norm = next((t for t in steps if isinstance(t, Normalize)), None)
    if resize is None or norm is None:
        raise ValueError(f"unsupported CLIP preprocess (need Resize and Normalize): {bundle.preprocess}")
    size = resize.size
    if isinstance(size, int) or len(size) == 1:  # shortest side, then a square centre crop
        s = size if isinstance(size, int) else size[0]
        if crop is None or tuple(crop.size) != (s, s) or resize.max_size is not None:
            raise ValueError(
                f"unsupported CLIP preprocess (Resize({s}) needs CenterCrop({s})): {bundle.preprocess}"
            )
        mode = "shortest"
    elif size[0] == size[1] and crop is None:
        s, mode = size[0], "squash"
    else:
        raise ValueError(f"unsupported CLIP preprocess (non-square target): {bundle.preprocess}")
    return CropSpec(int(s), mode, tuple(float(m) for m in norm.mean), tuple(float(v) for v in norm.std))


# ---------------------------------------------------------------------------------------------
# Pure helpers: boxes, masks, blur, crops


def crop_boxes_xyxy(bbox_xywh: torch.Tensor, padding: float, h: int, w: int) -> torch.Tensor:
    """The padded integer crop box of each mask, as ``crop_with_background`` cuts it.

    Args:
        bbox_xywh: ``[M, 4]`` float boxes ``x, y, w, h`` in pixels (SA-1B ``bbox``).
        padding: box padding as a fraction of the box's width / height, on each side.
        h: image height.
        w: image width.

    Returns:
        ``[M, 4]`` int64 ``x0, y0, x1, y1`` (end exclusive), clipped to the image and at least one
        pixel wide and high. Unlike the reference, ``x0``/``y0`` are also kept inside the image, so
        a box starting at or beyond the right/bottom border gives its last pixel, not an empty crop.
    """
    b = bbox_xywh.to(torch.float64)  # float64: the reference does this arithmetic on Python floats
    x, y, bw, bh = b.unbind(-1)
    px, py = bw * padding, bh * padding
    x0 = torch.floor(x - px).clamp(0, w - 1)
    y0 = torch.floor(y - py).clamp(0, h - 1)
    x1 = torch.maximum(torch.ceil(x + bw + px).clamp(max=w), x0 + 1)
    y1 = torch.maximum(torch.ceil(y + bh + py).clamp(max=h), y0 + 1)
    return torch.stack([x0, y0, x1, y1], -1).to(torch.int64)


def center_square(boxes_xyxy: torch.Tensor, size: int, resize_mode: str = "shortest") -> torch.Tensor:
    """The part of each crop box that the CLIP transform keeps, in image pixel coordinates.

    torchvision's ``Resize(size)`` scales a ``cw x ch`` crop so that its short side is ``size`` and
    its long side ``int(size * long / short)``; PIL maps output pixel ``j`` of an axis back to input
    coordinate ``(j + 0.5) * in / out``. ``CenterCrop(size)`` then keeps output pixels
    ``[c, c + size)`` with ``c = round((out - size) / 2)`` (Python's round, half to even). So the
    kept region of the crop is ``[c * in / out, (c + size) * in / out]`` per axis -- the centred,
    almost square part of the box; with ``"squash"`` it is the whole box.

    Args:
        boxes_xyxy: ``[M, 4]`` int ``x0, y0, x1, y1`` from ``crop_boxes_xyxy``.
        size: the CLIP input side ``S``.
        resize_mode: ``"shortest"`` or ``"squash"`` (see ``CropSpec``).

    Returns:
        ``[M, 4]`` float64 continuous ``x0, y0, x1, y1`` (pixel ``i`` spans ``[i, i + 1]``), the
        box convention of ``roi_align(..., aligned=True)``.
    """
    b = boxes_xyxy.to(torch.float64)
    x0, y0, x1, y1 = b.unbind(-1)
    if resize_mode == "squash":
        return b.clone()
    if resize_mode != "shortest":
        raise ValueError(f"resize_mode must be 'shortest' or 'squash', not {resize_mode!r}")
    cw, ch = x1 - x0, y1 - y0
    wide = cw > ch  # torchvision takes the width as the short side when w <= h
    short, long = torch.where(wide, ch, cw), torch.where(wide, cw, ch)
    new_long = torch.floor(size * long / short)  # same float ops, in the same order, as torchvision
    out_w = torch.where(wide, new_long, torch.full_like(cw, size))
    out_h = torch.where(wide, torch.full_like(ch, size), new_long)
    left = torch.round((out_w - size) / 2.0)  # torch.round is half-to-even, like Python's round
    top = torch.round((out_h - size) / 2.0)
    sx, sy = cw / out_w, ch / out_h
    return torch.stack([x0 + left * sx, y0 + top * sy, x0 + (left + size) * sx, y0 + (top + size) * sy], -1)


def gaussian_blur_separable(image_chw: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of standard deviation ``sigma``, as two 1-D passes.

    The same kernel as ``torchvision.transforms.functional.gaussian_blur`` with
    ``kernel_size = 2 * ceil(3 * sigma) + 1`` (its 2-D kernel is the outer product of this one), but
    2k instead of k^2 taps per pixel, and edge pixels repeated (as PIL's GaussianBlur does) rather
    than reflected, which also works for images smaller than the kernel.

    Args:
        image_chw: ``[C, H, W]`` float.
        sigma: standard deviation in pixels (PIL's ``GaussianBlur(radius)`` is this sigma); <= 0
            returns the input.

    Returns:
        ``[C, H, W]`` float, same dtype and device.
    """
    if sigma <= 0:
        return image_chw
    r = int(math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, dtype=image_chw.dtype, device=image_chw.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = image_chw.shape[0]
    x = F.pad(image_chw[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def roi_resample(
    images_nchw: torch.Tensor, rois_xyxy: torch.Tensor, size: int, batch_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Resample a box of an image to ``size x size`` per ROI (roi_align, pixel-aligned).

    Args:
        images_nchw: ``[N, C, H, W]`` float.
        rois_xyxy: ``[K, 4]`` continuous boxes (pixel ``i`` spans ``[i, i + 1]``).
        size: output side.
        batch_index: ``[K]`` which of the ``N`` images each ROI reads; None: image 0.

    Returns:
        ``[K, C, size, size]``; each bin is the mean of ``ceil(roi_side / size)^2`` bilinear samples,
        so shrinking averages (antialiases) and enlarging interpolates bilinearly.
    """
    idx = torch.zeros(len(rois_xyxy), device=rois_xyxy.device) if batch_index is None else batch_index
    boxes = torch.cat([idx.to(rois_xyxy)[:, None], rois_xyxy], 1).to(images_nchw)
    return roi_align(images_nchw, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def resample_masks(masks_mhw: torch.Tensor, rois_xyxy: torch.Tensor, size: int) -> torch.Tensor:
    """Resample mask ``i`` in ROI ``i`` (``roi_resample`` with one mask per ROI).

    Args:
        masks_mhw: ``[M, H, W]`` uint8 or bool, any strides.
        rois_xyxy: ``[M, 4]`` continuous boxes.
        size: output side.

    Returns:
        ``[M, 1, size, size]`` float32 in [0, 1].
    """
    index = torch.arange(len(masks_mhw), device=masks_mhw.device)
    if masks_mhw.transpose(1, 2).is_contiguous():
        # Column-major masks (what pycocotools decodes) are contiguous as [M, W, H]: resample that
        # with x and y swapped and swap back, rather than pay a transposing copy of every mask.
        out = roi_resample(
            masks_mhw.transpose(1, 2)[:, None].float(), rois_xyxy[:, [1, 0, 3, 2]], size, index
        )
        return out.transpose(-1, -2)
    return roi_resample(masks_mhw[:, None].float(), rois_xyxy, size, index)


def roi_axis_taps(lo: torch.Tensor, hi: torch.Tensor, size: int, n: int):
    """roi_align's resampling along one axis: which input pixels each output bin reads, and how much.

    ``torchvision.ops.roi_align(aligned=True, sampling_ratio=-1)`` averages, per output bin,
    ``ceil(roi_h / size) x ceil(roi_w / size)`` bilinear samples on a regular grid. A bilinear
    weight is the product of a y and an x weight, and a sample outside the image counts zero when
    either coordinate is out, so the whole operation is separable: the output is
    ``A_y @ X @ A_x^T`` with ``A`` the per-axis mean of the samples' interpolation weights. These
    are the nonzeros of ``A``, computed with the kernel's own float32 arithmetic in its order
    (position, the ``< -1`` / ``> n`` cut, the clamp at 0, the last pixel held), so that the
    products equal roi_align up to float rounding.

    Args:
        lo, hi: ``[K]`` float32 ROI bounds on this axis (pixel ``i`` spans ``[i, i + 1]``).
        size: output bins.
        n: the axis' length in the image, or ``[K]`` lengths (one call for both axes).

    Returns:
        ``index`` and ``weight``, ``[K, size, T]`` (int64 pixel, float32 weight; unused taps weigh
        0), and ``start``, ``extent``, ``[K]`` int64: every pixel a ROI reads is in
        ``start .. start + extent - 1``.
    """
    roi_start = lo - 0.5
    length = hi - lo
    bin_size = length / size
    grid = torch.ceil(length / size)  # samples per bin (0 for an empty ROI: its bins are 0)
    g = max(int(grid.max()) if len(lo) else 1, 1)
    n = torch.as_tensor(n, dtype=lo.dtype).expand(len(lo))
    last_pixel = (n - 1).view(-1, 1, 1)
    p = torch.arange(size, dtype=lo.dtype).view(1, -1, 1)
    i = torch.arange(g, dtype=lo.dtype).view(1, 1, -1)
    pos = (
        roi_start.view(-1, 1, 1) + p * bin_size.view(-1, 1, 1) + (i + 0.5) * (bin_size / grid).view(-1, 1, 1)
    )
    used = (i < grid.view(-1, 1, 1)) & (pos >= -1.0) & (pos <= n.view(-1, 1, 1))
    pos = pos.clamp(min=0)
    held = pos.floor() >= last_pixel  # at the last pixel: no pixel above
    low = torch.where(held, last_pixel, pos.floor())
    frac = torch.where(held, 0.0, pos - low)
    share = used.to(lo.dtype) / grid.clamp(min=1).view(-1, 1, 1)
    low = low.to(torch.int64)
    # a sample's two taps side by side, so that a ROI's unused samples (i >= grid) are its last taps
    index = torch.stack([low, torch.where(held, low, low + 1)], 3).flatten(2)
    weight = torch.stack([(1 - frac) * share, frac * share], 3).flatten(2)
    first = torch.minimum(torch.floor(roi_start).clamp(min=0), n - 1)
    last = torch.minimum((torch.floor(hi - 0.5) + 1).clamp(min=0), n - 1)
    return index, weight, first.to(torch.int64), (last - first).to(torch.int64) + 1


def local_taps(index: torch.Tensor, start: np.ndarray, width: np.ndarray) -> torch.Tensor:
    """Taps' pixels (``roi_axis_taps``) made window rows: ``index - start``, each ROI's clamped to
    its window's ``width`` rows (only unused taps, of weight 0, fall outside)."""
    local = (index - torch.from_numpy(start).view(-1, 1, 1)).clamp_(min=0)
    return torch.minimum(local, torch.from_numpy(width - 1).view(-1, 1, 1))


def tap_bags(local: torch.Tensor, weight: torch.Tensor, width: int, taps: int):
    """``k`` windows' taps (``local_taps``) as ``embedding_bag`` bags over the windows stacked.

    Returns ``rows, weights``, ``[k * size, taps]``: tap ``t`` of output bin ``p`` of window ``i``
    reads row ``i * width + local`` of the ``[k * width, ...]`` stack, with its weight. Only the
    first ``taps`` taps are kept (those after weigh 0 in every one of these windows).
    """
    offset = torch.arange(0, len(local) * width, width).view(-1, 1, 1)
    return (local[:, :, :taps] + offset).flatten(0, 1), weight[:, :, :taps].flatten(0, 1)


def taps_used(weight: torch.Tensor) -> np.ndarray:
    """``[K]``: per ROI, how many of its first taps (``roi_axis_taps``) it uses (at least 1)."""
    nz = (weight != 0).any(1).numpy()  # [K, T]
    return np.where(nz.any(1), nz.shape[1] - np.argmax(nz[:, ::-1], 1), 1)


def separable_resample(
    rois_xyxy: torch.Tensor, size: int, h, w, read, affine: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``roi_resample`` computes, resampling rows then columns of each ROI's window (on the CPU).

    torchvision's CPU roi_align works sample by sample on one thread (about 40 ns per sample and
    channel on the 2-core machine of ``benchmarks/README.md``). roi_align's sampling is separable
    (``roi_axis_taps``): each output row is a weighted sum of a few rows of the ROI's window, and
    each output column of a few columns of that. Here each ROI's window of the input is read once
    and both steps run as ``torch.nn.functional.embedding_bag`` with per-sample weights (a fused
    gather and weighted sum: the windows' rows are the table, an output row's taps its bag), over
    many ROIs at once, with one transposing copy between them. That touches each tap once, where
    the dense ``[size, hb] @ [hb, wb] @ [wb, size]`` products it replaced multiplied every zero of
    the banded matrices (4-6x the time at CLIP's crop sizes, ``benchmarks/README.md``). ROIs of
    similar window size (two groups per doubling) share one call, their windows padded to the
    largest in their group (no tap of weight above 0 reaches the padding).

    Args:
        rois_xyxy: ``[K, 4]`` continuous boxes, each inside its image.
        size: output side.
        h, w: the image's size, or ``[K]`` int arrays: each ROI's image's size.
        read: ``read(index, ys, xs, hb, wb)`` gives the windows ``[k, hb, C, wb]`` (float32,
            contiguous, on the CPU; channels inside rows, so one table row holds them all) of the
            ROIs ``index``: rows ``ys[i] .. ys[i] + hb`` and columns ``xs[i] .. xs[i] + wb``
            (``[k]`` int64 arrays) of ROI ``index[i]``'s image, all inside it.
        affine: optional per-channel ``scale, shift`` (``[C]`` each): the crops come out as
            ``crop * scale + shift``, applied as they are copied out (e.g. CLIP's normalisation,
            without another pass over all the crops).

    Returns:
        ``crops, order``: ``[K, C, size, size]`` float32 and ``[K]`` int64, where ``crops[j]`` is
        ROI ``order[j]``'s. ``crops`` is a view of the second step's own layout, ``[K, size (x),
        size (y), C]`` contiguous, not copied into ``[K, C, y, x]`` (see ``window_crops``, which
        reads a transposed image so that this layout is its crops' channels-last). The crops come
        group after group: putting them back in ROI order would be a scattered copy (torch's
        ``index_copy_`` goes element by element on a CPU, several times slower). CLIP does not
        mind the order; ``in_roi_order`` restores it where a caller needs it.
    """
    r = rois_xyxy.to(torch.float32)  # roi_align reads its boxes in the image's dtype
    k_all = len(r)
    if not k_all:
        return torch.zeros(0, 1, size, size), torch.zeros(0, dtype=torch.int64)
    h = np.broadcast_to(np.asarray(h, np.int64), (k_all,))
    w = np.broadcast_to(np.asarray(w, np.int64), (k_all,))
    # both axes in one call: y bounds then x bounds, each with its axis' length
    taps = roi_axis_taps(
        torch.cat([r[:, 1], r[:, 0]]), torch.cat([r[:, 3], r[:, 2]]), size, torch.from_numpy(np.r_[h, w])
    )
    y0, x0, hy, wx = (v.numpy() for v in (taps[2][:k_all], taps[2][k_all:], taps[3][:k_all], taps[3][k_all:]))
    used = taps_used(taps[1])
    # Group by window size (GROUPS_PER_OCTAVE groups per doubling), so that padding a window to
    # its group's largest costs little. A window padded to its group's size must still fit in
    # its image: ROIs of images smaller than the group's bound are grouped by image size too.
    group = np.ceil(GROUPS_PER_OCTAVE * np.log2(np.maximum(hy, wx))).astype(np.int64)
    bound = np.ceil(2.0 ** (group / GROUPS_PER_OCTAVE)).astype(np.int64)
    shape = np.unique(h * (int(w.max(initial=0)) + 1) + w, return_inverse=True)[1].reshape(-1)
    key = group * (k_all + 1) + np.where((h < bound) | (w < bound), shape + 1, 0)
    # ROIs in group order, so that each group is a slice; every ROI's window and taps at once
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
    hb_g, wb_g = np.maximum.reduceat(hy[order], starts), np.maximum.reduceat(wx[order], starts)
    hb_r, wb_r = (np.repeat(v, np.diff(np.r_[starts, k_all])) for v in (hb_g, wb_g))
    ys, xs = np.minimum(y0[order], h[order] - hb_r), np.minimum(x0[order], w[order] - wb_r)  # pad inwards
    t = torch.from_numpy(order)
    rows_all, wy = local_taps(taps[0][t], ys, hb_r), taps[1][t]
    cols_all, wx = local_taps(taps[0][k_all + t], xs, wb_r), taps[1][k_all + t]
    used_y, used_x = used[order], used[k_all + order]
    out = None
    ends = np.r_[starts[1:], k_all]
    for s, e, hb, wb in zip(starts.tolist(), ends.tolist(), hb_g.tolist(), wb_g.tolist(), strict=True):
        per_call = max(1, WINDOW_PIXELS_AT_ONCE // (hb * wb))  # bounds the windows' memory
        for part in np.array_split(np.arange(s, e), -(-(e - s) // per_call)):
            i, j = int(part[0]), int(part[-1]) + 1
            win = read(order[i:j], ys[i:j], xs[i:j], hb, wb)  # [k, hb, C, wb]
            k, c = j - i, win.shape[2]
            # rows: each output row a weighted sum of a few window rows ([S, C, wb] per window)
            rows, weights = tap_bags(rows_all[i:j], wy[i:j], hb, int(used_y[i:j].max()))
            res = F.embedding_bag(rows, win.view(k * hb, c * wb), mode="sum", per_sample_weights=weights)
            # columns: the same on the transposed result, whose rows are the windows' columns
            res = res.view(k, size, c, wb).permute(0, 3, 1, 2).reshape(k * wb, size * c)
            cols, weights = tap_bags(cols_all[i:j], wx[i:j], wb, int(used_x[i:j].max()))
            res = F.embedding_bag(cols, res, mode="sum", per_sample_weights=weights)  # [k*S(x), S(y)*C]
            if out is None:
                out = torch.empty(k_all, size, size, c)
                if affine is not None:  # per channel, tiled over a row of [size, C]
                    scale, shift = (v.to(out).repeat(size) for v in affine)
            if affine is None:
                out[i:j].copy_(res.view(k, size, size, c))
            else:
                torch.addcmul(
                    shift, res.view(k * size, size * c), scale, out=out[i:j].view(k * size, size * c)
                )
    return out.permute(0, 3, 2, 1), torch.from_numpy(order)


def in_roi_order(crops: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``separable_resample``'s (or ``window_crops``') crops put back in ROI order."""
    return crops.index_select(0, torch.argsort(order))


def run_toggles(counts: np.ndarray, lengths: np.ndarray, h: int, w: int) -> np.ndarray:
    """Where ``M`` masks' COCO runs (``ssam.overlay.coco_counts``) flip between 0 and 1.

    Returns:
        Sorted int64 keys ``k * h * w + p``: mask ``k`` changes value at its column-major pixel
        ``p`` (the first pixel of each run but its first). The mask at ``p`` is the parity of its
        keys at or before ``p``.
    """
    m = len(lengths)
    first = np.cumsum(lengths) - lengths
    mask = np.repeat(np.arange(m), lengths)
    total = np.cumsum(counts)
    ends = total - np.repeat(total[first] - counts[first], lengths)  # within each mask
    inside = np.ones(len(counts), bool)
    inside[first + lengths - 1] = False  # a mask's last run ends at h * w: nothing to toggle
    keys = mask[inside] * (h * w) + ends[inside]  # sorted already: counts are >= 0, masks in order
    first_of = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else keys
    times = np.diff(np.r_[first_of, len(keys)])
    return keys[first_of[times % 2 == 1]]  # a zero-length run puts two ends on one pixel: they cancel


def masks_from_counts(counts: np.ndarray, lengths: np.ndarray, h: int, w: int, device) -> torch.Tensor:
    """``M`` masks from their COCO run lengths (``ssam.overlay.coco_counts``), built on ``device``.

    Only where the runs end goes to the device (a few KB), not ``M x H x W`` decoded bytes: a mask
    has a 1 at each pixel where a run ends inside it, and the running sum of those, modulo 2, is
    the mask (in ``uint8``, which wraps at 256 and so keeps the parity). On a CPU this takes
    about what pycocotools' decoding does; on a GPU it is one scan over device memory, and the
    host neither decodes nor uploads the pixels.

    Returns:
        ``[M, H, W]`` uint8 in {0, 1}, a view of a column-major (``[M, W, H]``-contiguous) buffer,
        as pycocotools decodes.
    """
    m = len(lengths)
    buf = torch.zeros(m, h * w, dtype=torch.uint8, device=device)
    buf.view(-1)[torch.as_tensor(run_toggles(counts, lengths, h, w), device=device)] = 1
    return torch.cumsum(buf, 1, dtype=torch.uint8).bitwise_and_(1).view(m, w, h).transpose(1, 2)


def window_masks(
    toggles: np.ndarray, starts: np.ndarray, h: np.ndarray, w: np.ndarray, ys: np.ndarray, xs: np.ndarray, out
) -> np.ndarray:
    """Write masks inside one window each into ``out``, from their ``run_toggles``.

    Like ``masks_from_counts`` but only a window's pixels per mask, on the CPU: each window column
    starts from the mask's value at its top (the parity of the mask's toggles up to there, by
    binary search), then steps +1 where the mask turns on and -1 where it turns off (a mask's
    toggles alternate, starting with on), and a running sum down the column is the mask -- in
    ``uint8`` too, where -1 wraps to 255 and the sum wraps back.

    Args:
        toggles: sorted keys: ``run_toggles`` of one image's masks, or of several images'
            concatenated with each image's keys shifted past the previous image's.
        starts: ``[k]`` the key of each wanted mask's first pixel (``j * h * w`` for mask ``j`` of
            one image's ``run_toggles``).
        h, w: ``[k]`` (or scalars) the size of each mask's image.
        ys, xs: ``[k]`` each window's top row and left column.
        out: ``[k, hb, wb]`` numpy array (uint8 or float, any strides) for the 0/1 masks; the
            windows lie inside the images.

    Returns:
        ``out``.
    """
    k, hb, wb = out.shape
    h, w = np.broadcast_to(h, (k,)), np.broadcast_to(w, (k,))
    lo, hi = np.searchsorted(toggles, starts), np.searchsorted(toggles, starts + h * w)
    top = starts[:, None] + (xs[:, None] + np.arange(wb)) * h[:, None] + ys[:, None]  # each column's top
    out[:, 0, :] = (np.searchsorted(toggles, top, side="right") - lo[:, None]) & 1  # the value there
    out[:, 1:, :] = 0
    owner = np.repeat(np.arange(k), hi - lo)
    rank = np.arange(owner.size) - np.repeat(np.cumsum(hi - lo) - (hi - lo), hi - lo)  # within its mask
    pos = toggles[lo[owner] + rank] - starts[owner]
    row, col = pos % h[owner] - ys[owner], pos // h[owner] - xs[owner]
    keep = (row > 0) & (row < hb) & (col >= 0) & (col < wb)  # row 0: already in the value at the top
    out[owner[keep], row[keep], col[keep]] = np.where(rank[keep] % 2 == 0, 1, -1).astype(out.dtype)
    t = torch.from_numpy(out)
    torch.cumsum(t, 1, dtype=t.dtype, out=t)  # several times faster than numpy's down a column
    return out


def compose_crops(
    image_rois: torch.Tensor,
    mask_rois: torch.Tensor | None,
    background: str,
    dim: float,
    blurred_rois: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the background outside the mask to resampled crops.

    The reference composites at full resolution and resamples: ``R(I * m + I * (1 - m) * dim)`` for
    ``"dim"``, ``R(I * m + B * (1 - m))`` for ``"blur"`` (``R`` the resampling, ``B`` the blurred
    image). On a GPU that would need one full-size composite per mask (the CPU path composites
    each mask's window instead, ``window_crops``). Here the image and each
    mask are resampled separately and combined: ``R(I) * R(m) + R(I) * (1 - R(m)) * dim`` and
    ``R(I) * R(m) + R(B) * (1 - R(m))``. The composite is linear in the mask, so this is exact
    wherever the mask is constant over a bin's sampling footprint -- everywhere but the bins that
    straddle the mask's edge, where it takes the product of the bin means instead of the mean of
    the products (the difference is the covariance of image and mask inside that bin, bounded by
    the image's variation across the edge).

    Args:
        image_rois: ``[M, C, S, S]`` resampled image, 0..255.
        mask_rois: ``[M, 1, S, S]`` resampled masks in [0, 1]; unused for ``"none"``.
        background: ``"dim"``, ``"blur"`` or ``"none"``.
        dim: the factor outside the mask for ``"dim"``.
        blurred_rois: ``[M, C, S, S]`` resampled blurred image, for ``"blur"``.

    Returns:
        ``[M, C, S, S]`` crops, 0..255.
    """
    if background == "none":
        return image_rois
    if background == "dim":
        return image_rois * (dim + (1.0 - dim) * mask_rois)
    if background == "blur":
        return blurred_rois + (image_rois - blurred_rois) * mask_rois
    raise ValueError(f"background must be one of {BACKGROUNDS}, not {background!r}")


def image_mask_crops(
    image: np.ndarray,
    anns: Sequence[dict],
    spec: CropSpec,
    device: torch.device,
    *,
    padding: float,
    background: str,
    dim: float,
    blur_radius: float,
    mask_chunk: int = 32,
    resample: str = "auto",
) -> torch.Tensor:
    """All mask crops of one image, CLIP-normalised, on ``device``.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        anns: ``M`` SA-1B annotations (``segmentation`` RLE, ``bbox`` XYWH).
        spec: the CLIP transform (``crop_spec``).
        device: where to cut.
        padding, background, dim, blur_radius: as ``embed_mask_crops``.
        mask_chunk: ``"roi_align"``: masks converted to float and resampled at a time (bounds the
            ``[chunk, H, W]`` float32 buffer roi_align needs).
        resample: ``"roi_align"`` (``roi_align_crops``: torchvision's kernel on the image and on
            full-size masks), ``"separable"`` (``window_crops``: per-ROI windows composited at full
            resolution, then the same resampling as roi_align, separably; CPU only) or
            ``"auto"``: separable on a CPU, roi_align elsewhere.

    Returns:
        ``[M, 3, S, S]`` float32 normalised crops, in the order of ``anns``.
    """
    if resample_for(resample, device) == "separable":
        (crops, order), *_ = cpu_crop_chunks([image], [anns], spec, padding, background, dim, blur_radius)
        return in_roi_order(crops, torch.from_numpy(order))
    rois = crop_rois(image, anns, spec, padding).to(device)
    crops = roi_align_crops(image, anns, rois, spec.size, device, background, dim, blur_radius, mask_chunk)
    return normalise(crops, spec)


def resample_for(resample: str, device: torch.device) -> str:
    """``"auto"`` made ``"separable"`` on a CPU and ``"roi_align"`` elsewhere; checks the others."""
    if resample == "auto":
        return "separable" if device.type == "cpu" else "roi_align"
    if resample not in ("separable", "roi_align"):
        raise ValueError(f"resample must be 'auto', 'separable' or 'roi_align', not {resample!r}")
    if resample == "separable" and device.type != "cpu":
        raise ValueError(f"resample='separable' runs on the CPU, not on {device}")
    return resample


def crop_rois(image: np.ndarray, anns: Sequence[dict], spec: CropSpec, padding: float) -> torch.Tensor:
    """``[M, 4]`` float32: the region of the image each annotation's crop shows (``center_square``).

    Raises:
        ValueError: an image that is not ``[H, W, 3]`` uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    bbox = torch.tensor([[float(v) for v in a["bbox"]] for a in anns], dtype=torch.float64).view(-1, 4)
    return center_square(crop_boxes_xyxy(bbox, padding, h, w), spec.size, spec.resize_mode).to(torch.float32)


def normalise(crops: torch.Tensor, spec: CropSpec) -> torch.Tensor:
    """CLIP's normalisation of 0..255 crops, in place."""
    mean = torch.tensor(spec.mean, device=crops.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=crops.device).view(1, 3, 1, 1) * 255.0
    return crops.sub_(mean).div_(std)


def window_crops(
    images: Sequence[np.ndarray],
    segmentations: Sequence[Sequence[dict]],
    rois: Sequence[torch.Tensor],
    size: int,
    background: str,
    dim: float,
    blur_radius: float,
    normalise_to: CropSpec | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask crops on the CPU: each ROI's window composited as the reference does, then resampled.

    Each ROI's window of its image (and, for ``"blur"``, of the blurred image) is cut with its mask
    (``window_masks``), the background applied at full resolution -- the reference's order, which
    ``compose_crops`` approximates to avoid full-size composites -- and the windows of all the
    images resampled together by ``separable_resample`` (fewer, fuller calls than image by image).
    Windows are cut with numpy (a slice and a stack cost a few times less than torch's copies), in
    uint8 with the mask as one more channel unless the planes are float. They are cut from the
    transposed image (``[W, C, H]``: its rows are the image's columns, holding all channels), so
    that ``separable_resample``'s output layout, x-major for what it reads, is the crops' own
    channels-last ``[K, y, x, C]``: no copy of the crops into ``[K, C, y, x]``.

    Args:
        images: ``N`` images ``[H_i, W_i, 3]`` uint8 RGB.
        segmentations: per image its ``M_i`` COCO RLEs (unused for ``"none"``).
        rois: per image ``[M_i, 4]`` float32 boxes (``center_square``).
        size: the crops' side.
        background, dim, blur_radius: as ``embed_mask_crops``.
        normalise_to: a CLIP's transform whose normalisation the crops get (as ``normalise``
            does, but as they are written); None: the crops stay 0..255.

    Returns:
        ``crops, order`` (``separable_resample``): ``[sum M_i, 3, size, size]`` float32 crops,
        0..255 or normalised, channels-last in memory, where ``crops[j]`` is the ``order[j]``-th
        mask counting image after image.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, not {background!r}")
    m = np.array([len(r) for r in rois], np.int64)
    if not m.sum():
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.int64)
    sizes = np.array([im.shape[:2] for im in images], np.int64).reshape(-1, 2)
    owner = np.repeat(np.arange(len(images)), m)
    h, w = sizes[owner, 0], sizes[owner, 1]
    srcs, toggles, starts = [], None, None
    for image in images:
        if background == "blur":  # blurred in the transposed frame too (the blur is symmetric)
            img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 1, 0))).float()  # [3, W, H]
            src = torch.cat([img, gaussian_blur_separable(img, blur_radius)], 0).permute(1, 0, 2).numpy()
        else:
            src = image.transpose(1, 2, 0)
        srcs.append(np.ascontiguousarray(src))  # [W, C, H]: a window's columns hold all its channels
    if background != "none":  # "none" needs no mask at all, only the box
        area = sizes[:, 0] * sizes[:, 1]
        shift = np.cumsum(m * area) - m * area  # each image's keys after the previous image's
        toggles = np.concatenate(
            [np.zeros(0, np.int64)]
            + [
                run_toggles(*coco_counts(segs, hh, ww), hh, ww) + s
                for segs, (hh, ww), s in zip(segmentations, sizes.tolist(), shift.tolist(), strict=True)
            ]
        )
        local = np.arange(len(owner)) - np.repeat(np.cumsum(m) - m, m)  # each mask's index in its image
        starts = shift[owner] + local * area[owner]
    c = 6 if background == "blur" else 3
    dtype = np.float32 if background == "blur" else np.uint8

    def read(ix, xs, ys, wb, hb):  # in the transposed image: its rows are x, its columns y
        win = np.empty((len(ix), wb, c + (toggles is not None), hb), dtype)
        np.stack(
            [
                srcs[i][x : x + wb, :, y : y + hb]
                for i, x, y in zip(owner[ix].tolist(), xs.tolist(), ys.tolist(), strict=True)
            ],
            out=win[:, :, :c],
        )
        t = torch.from_numpy(win)
        if toggles is None:
            return t.float()
        window_masks(toggles, starts[ix], h[ix], w[ix], ys, xs, win[:, :, c].transpose(0, 2, 1))
        keep = t[:, :, c:].float()
        if background == "dim":  # the reference's I * m + I * (1 - m) * dim
            # made float first: a product that casts uint8 as it broadcasts runs ~2.5x slower
            return t[:, :, :3].float().mul_(keep.mul_(1.0 - dim).add_(dim))
        return torch.lerp(t[:, :, 3:6], t[:, :, :3], keep)  # blurred outside, sharp inside

    affine = None
    if normalise_to is not None:  # (x - mean) / std as x * (1 / std) - mean / std, of 0..255 pixels
        mean, std = (
            torch.tensor(v, dtype=torch.float64) * 255.0 for v in (normalise_to.mean, normalise_to.std)
        )
        affine = (1.0 / std, -mean / std)
    # the transposed problem: x and y swapped in the boxes and sizes; its crops transposed back
    crops, order = separable_resample(torch.cat(list(rois))[:, [1, 0, 3, 2]], size, w, h, read, affine)
    return crops.transpose(2, 3), order


def roi_align_crops(
    image: np.ndarray,
    anns: Sequence[dict],
    rois: torch.Tensor,
    size: int,
    device: torch.device,
    background: str,
    dim: float,
    blur_radius: float,
    mask_chunk: int,
) -> torch.Tensor:
    """Mask crops with ``roi_align`` on ``device``: the image and each mask resampled apart, then
    combined (``compose_crops``). ``[M, 3, size, size]`` float32, 0..255."""
    h, w = image.shape[:2]
    img = (
        torch.from_numpy(image if image.flags.writeable else image.copy()).to(device).permute(2, 0, 1).float()
    )  # uint8 over the bus, float there
    planes = img
    if background == "blur":  # image and blurred image resampled in one roi_align, as 6 channels
        planes = torch.cat([img, gaussian_blur_separable(img, blur_radius)], 0)
    if len(anns) == 0:
        return torch.zeros((0, 3, size, size), device=device)
    res = roi_resample(planes[None], rois, size)  # [M, 3 or 6, S, S]
    image_rois, blurred_rois = res[:, :3], (res[:, 3:] if background == "blur" else None)
    mask_rois = None
    if background != "none":  # "none" needs no mask at all, only the box
        counts, lengths = coco_counts([a["segmentation"] for a in anns], h, w)
        offsets = np.r_[0, np.cumsum(lengths)]
        chunks = []
        for i in range(0, len(anns), mask_chunk):
            j = min(i + mask_chunk, len(anns))
            masks = masks_from_counts(counts[offsets[i] : offsets[j]], lengths[i:j], h, w, device)
            chunks.append(resample_masks(masks, rois[i:j], size))
        mask_rois = torch.cat(chunks)
    return compose_crops(image_rois, mask_rois, background, dim, blurred_rois)


def cpu_crop_chunks(
    images: Sequence[np.ndarray],
    annotations: Sequence[Sequence[dict]],
    spec: CropSpec,
    padding: float,
    background: str,
    dim: float,
    blur_radius: float,
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """The CPU path of ``embed_mask_crops``: the CLIP-normalised crops of consecutive images'
    masks, cut together (``window_crops``) at most ``WINDOW_CROPS_AT_ONCE`` masks and
    ``WINDOW_CROP_BYTES_AT_ONCE`` bytes of crops at a time (an image with more comes alone).

    Yields:
        ``crops, order``: ``[m, 3, S, S]`` crops (channels-last) and ``[m]`` int64, where
        ``crops[j]`` is the ``order[j]``-th mask counting from the first image's first; at least
        one chunk, if empty.
    """
    done = 0
    at_once = max(1, min(WINDOW_CROPS_AT_ONCE, WINDOW_CROP_BYTES_AT_ONCE // (12 * spec.size**2)))
    for chunk in image_chunks([len(a) for a in annotations], at_once):
        ims, anns = [images[i] for i in chunk], [annotations[i] for i in chunk]
        crops, order = window_crops(
            ims,
            [[a["segmentation"] for a in x] for x in anns],
            [crop_rois(image, x, spec, padding) for image, x in zip(ims, anns, strict=True)],
            spec.size,
            background,
            dim,
            blur_radius,
            normalise_to=spec,
        )
        yield crops, order.numpy() + done
        done += len(crops)


def image_chunks(masks_per_image: Sequence[int], at_most: int) -> Iterator[list[int]]:
    """Consecutive runs of image indices with at most ``at_most`` masks in all (an image with more
    comes alone), so that cutting a run's crops at once bounds their memory."""
    run, n = [], 0
    for i, m in enumerate(masks_per_image):
        if run and n + m > at_most:
            yield run
            run, n = [], 0
        run.append(i)
        n += m
    if run:
        yield run


def rebatch(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of ``[m_i, ...]`` tensors into ``[batch_size, ...]`` ones (the last may be short).

    Keeps at most ``batch_size + max m_i`` rows pending, so the crops of a large batch of images
    never all sit in memory at once; batches mix rows of consecutive chunks.
    """
    pending: list[torch.Tensor] = []
    n = 0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        pending.append(chunk)
        n += len(chunk)
        if n >= batch_size:
            cat = pending[0] if len(pending) == 1 else torch.cat(pending)
            full = (n // batch_size) * batch_size
            yield from cat[:full].split(batch_size)
            pending, n = ([cat[full:]] if full < n else []), n - full
    if n:
        yield torch.cat(pending)


# ---------------------------------------------------------------------------------------------
# Public API


@torch.no_grad()
def embed_mask_crops(
    bundle: ClipBundle,
    images: Sequence[np.ndarray],
    annotations: Sequence[Sequence[dict]],
    *,
    padding: float,
    background: str,
    dim: float,
    blur_radius: float,
    batch_size: int,
    bf16: bool = False,
    mask_chunk: int = 32,
    encode=None,
    resample: str = "auto",
) -> list[np.ndarray]:
    """CLIP embeddings of every mask crop of a batch of images.

    Crops are cut, resampled and normalised on the CLIP's device (see the module docstring) and
    encoded ``batch_size`` at a time, crops of different images in the same forward.

    Args:
        bundle: the CLIP (``ssam.model.clip.load_clip``); its device is used.
        images: ``N`` images ``[H_i, W_i, 3]`` uint8 RGB.
        annotations: per image its SA-1B annotations (``segmentation`` RLE of the image's size,
            ``bbox`` XYWH).
        padding: crop box padding, a fraction of the box size on each side (``labels.crop_padding``).
        background: ``"dim"``, ``"blur"`` or ``"none"``: what happens outside the mask.
        dim: ``"dim"``: factor for pixels outside the mask (``labels.background_dim``).
        blur_radius: ``"blur"``: Gaussian sigma in pixels (``labels.blur_radius``).
        batch_size: crops per encoder forward (``labels.clip_batch_size``).
        bf16: bfloat16 autocast for the encoder on CUDA.
        mask_chunk: masks resampled at a time (memory bound, not a result change).
        encode: what runs the image tower (default ``bundle.model.encode_image``; e.g. a
            compiled one).
        resample: how crops are resampled (``image_mask_crops``); the default picks by device.

    Returns:
        Per image a float32 ``[M_i, D]`` array of L2-normalised embeddings, in annotation order
        (``[0, D]`` for an image without annotations).

    Raises:
        ValueError: unknown ``background``, a malformed image, an RLE of another size, or a CLIP
            transform this engine cannot reproduce.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, not {background!r}")
    if len(images) != len(annotations):
        raise ValueError(f"{len(images)} images but {len(annotations)} annotation lists")
    spec = crop_spec(bundle)
    device = next(bundle.model.parameters()).device
    orders: list[np.ndarray] = []  # the CPU path's crop order, for its embeddings

    def cpu_chunks() -> Iterator[torch.Tensor]:
        for crops, order in cpu_crop_chunks(images, annotations, spec, padding, background, dim, blur_radius):
            orders.append(order)
            yield crops

    if resample_for(resample, device) == "separable":
        crops = cpu_chunks()
    else:
        crops = (
            image_mask_crops(
                image,
                anns,
                spec,
                device,
                padding=padding,
                background=background,
                dim=dim,
                blur_radius=blur_radius,
                mask_chunk=mask_chunk,
                resample=resample,
            )
            for image, anns in zip(images, annotations, strict=True)
        )
    embs = [encode_images(bundle, batch, bf16, encode) for batch in rebatch(crops, batch_size)]
    counts = [len(a) for a in annotations]
    if not counts:
        return []
    flat = np.concatenate(embs) if embs else np.zeros((0, bundle.embed_dim), np.float32)
    if orders:  # back in annotation order
        flat[np.concatenate(orders)] = flat.copy()
    return [part.astype(np.float32, copy=False) for part in np.split(flat, np.cumsum(counts)[:-1])]


class TextEmbeddingCache:
    """Prompt-ensembled CLIP text embeddings, each label computed once and kept across batches.

    Keyed by label only: one cache per (CLIP, templates). With ``path`` the table is read from and
    written to disk (the ``{label: float32 tensor [D]}`` file of the trainer's ``TextEmbeddings``).

    Args:
        bundle: the CLIP.
        templates: prompt templates, each with one ``{}``; None or empty: ``DEFAULT_TEMPLATES``.
        path: optional file to load the table from (if it exists) and ``save`` it to.
    """

    def __init__(self, bundle: ClipBundle, templates: Sequence[str] | None = None, path: Path | None = None):
        self.bundle = bundle
        self.templates = tuple(templates) if templates else DEFAULT_TEMPLATES
        self.path = Path(path) if path is not None else None
        self.table: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.exists():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            self.table = {k: v.float().numpy() for k, v in saved.items()}

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, label: str) -> bool:
        return label in self.table

    def get(self, labels: Sequence[str]) -> np.ndarray:
        """Float32 ``[len(labels), D]`` L2-normalised embeddings, rows in the order of ``labels``.

        Labels not seen before are encoded in one call; repeated labels are encoded once.
        """
        missing = [lab for lab in dict.fromkeys(labels) if lab not in self.table]
        if missing:
            self.table.update(zip(missing, encode_texts(self.bundle, missing, self.templates), strict=True))
        if not labels:
            return np.zeros((0, self.bundle.embed_dim), np.float32)
        return np.stack([self.table[lab] for lab in labels]).astype(np.float32, copy=False)

    def save(self) -> None:
        """Write the table to ``path`` atomically (no-op without a path)."""
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in self.table.items()}, tmp)
