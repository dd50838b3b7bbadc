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
