"""Overlay pictures: masks filled in distinct colours, outlined, with their label names.

Used by ``ssam-pipeline show`` (shards) and the predictor. Output of smoke models gets a red
banner saying so, in the picture itself.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated colours (golden-ratio hue steps), the same on every call."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def coco_rle(seg: dict) -> dict:
    """A compressed RLE as pycocotools takes it: our files keep ``counts`` as a string (JSON), its
    C functions want bytes."""
    c = seg["counts"]
    return {"size": seg["size"], "counts": c.encode() if isinstance(c, str) else c}


def decode_rle(seg: dict) -> np.ndarray:
    """COCO RLE (counts str or bytes) -> HxW bool mask."""
    return mask_utils.decode(coco_rle(seg)).astype(bool)


def decode_rles(segmentations: Sequence[dict], h: int, w: int) -> np.ndarray:
    """Decode the SA-1B / COCO RLEs of one image at once.

    Args:
        segmentations: ``M`` dicts ``{"size": [h, w], "counts": str | bytes | list[int]}``.
        h: image height (every RLE must have this size).
        w: image width.

    Returns:
        ``[M, h, w]`` uint8 masks in {0, 1}: a view, not a copy, of pycocotools' column-major
        ``[h, w, M]``, so ``masks.transpose(0, 2, 1)`` (``[M, w, h]``) is the C-contiguous one.
    """
    if not segmentations:
        return np.zeros((0, h, w), np.uint8)
    rles = []
    for seg in segmentations:
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"mask size {seg['size']} != image size {[h, w]}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rles.append(mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w))
        else:
            rles.append(coco_rle(seg))
    return mask_utils.decode(rles).transpose(2, 0, 1)


def coco_counts(segmentations: Sequence[dict], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The run lengths of one image's COCO RLEs, without decoding a pixel.

    Compressed ``counts`` strings are parsed in a few vectorised numpy passes over all their
    characters at once (written by hand: pycocotools decodes a string only as far as the whole
    mask, and has no public call that returns its counts). The format is pycocotools'
    ``rleToString``: each count is 5-bit groups, least significant first, as characters from
    ``'0'``; ``0x20`` marks that another group follows and ``0x10`` in the last group is the sign;
    from the fourth count on, each is stored as its difference to the count two before it.

    Args:
        segmentations: ``M`` dicts ``{"size": [h, w], "counts": str | bytes | list[int]}``.
        h, w: the image's size, which every RLE must have.

    Returns:
        ``counts`` (int64, mask k's runs after mask k-1's, zeros first) and ``lengths`` (``M``,
        runs per mask).

    Raises:
        ValueError: an RLE of another size, or counts that are negative or do not add up to
            ``h * w`` (naming the mask).
    """
    if not segmentations:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    raw, lists = [], {}
    for k, seg in enumerate(segmentations):
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"mask {k}: size {seg['size']} != image size {[h, w]}")
        c = seg["counts"]
        if isinstance(c, list):  # uncompressed RLE: the counts themselves
            lists[k] = np.asarray(c, np.int64)
            c = b""
        raw.append(c.encode() if isinstance(c, str) else bytes(c))
    chars = np.frombuffer(b"".join(raw), np.uint8).astype(np.int64) - 48
    last = (chars & 0x20) == 0  # the last character of a count
    ends = np.cumsum([len(r) for r in raw])
    cut = np.flatnonzero((np.diff(np.r_[0, ends]) > 0) & ~last[np.maximum(ends - 1, 0)]) if len(chars) else []
    if len(cut):
        raise ValueError(f"mask {int(cut[0])}: the RLE string ends inside a count")
    start = np.flatnonzero(np.r_[True, last[:-1]]) if len(chars) else np.zeros(0, np.int64)
    shift = 5 * (np.arange(len(chars)) - np.repeat(start, np.diff(np.r_[start, len(chars)])))
    values = np.add.reduceat((chars & 0x1F) << shift, start) if len(chars) else np.zeros(0, np.int64)
    negative = (chars[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, shift[last][negative] + 5)  # sign-extend
    lengths = np.diff(np.r_[0, np.searchsorted(np.flatnonzero(last), ends - 1, side="right")])
    # Undo the differences: within a mask, count 0 stays, the odd ones are the running sum of the
    # odd ones, the even ones from 2 on the running sum of those. One running sum per parity over
    # all masks at once, less what the masks before each one had summed.
    begin = np.cumsum(lengths) - lengths
    index = np.arange(len(values)) - np.repeat(begin, lengths)
    first = np.minimum(begin, max(len(values) - 1, 0))  # an empty mask's is never used
    counts = values.copy()
    for parity in (1, 0):
        mine = (index % 2 == parity) & (index > 0)
        sums = np.cumsum(np.where(mine, values, 0))
        counts = np.where(mine, sums - np.repeat(sums[first], lengths), counts) if len(values) else counts
    if lists:  # put the uncompressed ones in their places
        parts = np.split(counts, np.cumsum(lengths)[:-1])
        for k, c in lists.items():
            parts[k] = c
        lengths = np.array([len(p) for p in parts], np.int64)
        counts = np.concatenate(parts) if parts else counts
    mask = np.repeat(np.arange(len(raw)), lengths)
    totals = np.bincount(mask, counts, minlength=len(raw))  # float64: exact below 2**53
    bad = np.flatnonzero(totals != h * w)
    if len(bad) or (counts < 0).any():
        k = int(bad[0]) if len(bad) else int(mask[counts < 0][0])
        raise ValueError(f"mask {k}: RLE counts are negative or do not add up to {h}x{w}")
    return counts, lengths.astype(np.int64)


def rle_ious(dt: Sequence[dict], gt: Sequence[dict]) -> np.ndarray:
    """``[len(dt), len(gt)]`` IoUs between two lists of one image's COCO RLEs (counts str or bytes)."""
    if not dt or not gt:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_utils.iou([coco_rle(s) for s in dt], [coco_rle(s) for s in gt], [0] * len(gt)))


def _outline(mask_hw: np.ndarray) -> np.ndarray:
    inner = mask_hw.copy()
    inner[1:] &= mask_hw[:-1]
    inner[:-1] &= mask_hw[1:]
    inner[:, 1:] &= mask_hw[:, :-1]
    inner[:, :-1] &= mask_hw[:, 1:]
    return mask_hw & ~inner


def render_overlay(
    image_hwc: np.ndarray,
    annotations: list[dict],
    smoke: bool = False,
    alpha: float = 0.45,
    caption: str | None = None,
) -> Image.Image:
    """The image with each annotation's mask filled, outlined and named (``label`` and score).

    Args:
        image_hwc: HxWx3 uint8 RGB.
        annotations: annotations as docs/FORMAT.md defines them (``segmentation`` RLE, ``bbox``, optional ``label``).
        smoke: draw the "smoke models" banner.
        caption: a line of text drawn under the image (e.g. the source caption).
    """
    canvas = image_hwc.astype(np.float32).copy()
    colors = palette(len(annotations))
    order = sorted(range(len(annotations)), key=lambda i: -annotations[i]["area"])  # big first, small on top
    for i in order:
        m = decode_rle(annotations[i]["segmentation"])
        c = np.array(colors[i], np.float32)
        canvas[m] = canvas[m] * (1 - alpha) + c * alpha
        canvas[_outline(m)] = c
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(11, img.size[0] // 45))
    for i in order:
        ann = annotations[i]
        if not ann.get("label"):
            continue
        x, y = ann["bbox"][0], ann["bbox"][1]
        text = f"{ann['label']} {ann.get('label_score', 0):.2f}"
        box = draw.textbbox((x + 2, y + 2), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x + 2, y + 2), text, fill=colors[i], font=font)
    if smoke or caption:
        extra = (28 if smoke else 0) + (24 if caption else 0)
        framed = Image.new("RGB", (img.size[0], img.size[1] + extra), (255, 255, 255))
        framed.paste(img, (0, 28 if smoke else 0))
        d = ImageDraw.Draw(framed)
        small = ImageFont.load_default(size=14)
        if smoke:
            d.rectangle((0, 0, img.size[0], 27), fill=(200, 20, 20))
            d.text(
                (6, 6),
                "SMOKE MODELS: random weights, masks and labels are meaningless",
                fill="white",
                font=small,
            )
        if caption:
            d.text((6, framed.size[1] - 20), caption[:120], fill=(0, 0, 0), font=small)
        img = framed
    return img
