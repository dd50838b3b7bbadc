"""Training data: our shards and SA-1B tars, streamed, mixed by weight, turned into prompts and targets.

Everything is read through :mod:`ssam.format`. Nothing is loaded whole: each source walks
its tars one sample at a time, in a shard order reshuffled every epoch from ``(seed, epoch)``.
A source's position ``(epoch, shard, sample)`` and the mixing generator's state are part of every
checkpoint, so a resumed run sees exactly the samples the uninterrupted run would have.
Samples held out for the predicted-IoU calibration (:func:`holdout_keys`, picked from the files
alone, so every worker and every resume picks the same) are skipped by ``(tar, key)``.

Bad data is counted, reported with its key, and skipped: a missing or truncated tar, a JSON that
breaks the format, an image that does not decode. More than ``data.max_bad_fraction`` of bad
samples aborts with :class:`DataError`.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms.functional import resize, to_pil_image

from ssam.format import decode_sample, iter_tar_samples, validate_sample
from ssam.overlay import coco_rle, decode_rle
from ssam.paths import expand_specs

log = logging.getLogger("ssam.train")


class DataError(RuntimeError):
    """Too much of the training data is bad, or there is none."""


def resolve_tars(specs: list[str]) -> list[Path]:
    """Tar files named by files, folders (their complete shards, when stats files exist) or globs.
    A named file that is missing stays in the list: reading it counts it as bad data."""
    out: list[Path] = []
    for spec, tars in expand_specs(specs, (".tar",)).items():
        done = [t for t in tars if (t.parent / f"{t.stem}.stats.json").exists()]
        out += done if Path(spec).expanduser().is_dir() and done else tars
    return out


@dataclass
class RawSample:
    key: str
    image: np.ndarray  # HxWx3 uint8
    meta: dict
    emb: np.ndarray | None
    source: str


class BadDataCounter:
    """Counts good and bad samples across sources; raises when the bad fraction passes the limit."""

    def __init__(self, max_bad_fraction: float, min_seen: int = 20):
        self.good = self.bad = 0
        self.max_bad, self.min_seen = max_bad_fraction, min_seen
        self.examples: list[str] = []

    def add_bad(self, what: str) -> None:
        self.bad += 1
        if len(self.examples) < 20:
            self.examples.append(what)
        log.warning("skipped bad training data: %s", what)
        seen = self.good + self.bad
        if seen >= self.min_seen and self.bad / seen > self.max_bad:
            raise DataError(
                f"{self.bad} of {seen} samples are bad (limit {self.max_bad:.0%}); first: {self.examples[:5]}"
            )


class TarSource:
    """One source's samples, forever, resumable. Worker ``rank`` of ``world`` sees its own part;
    samples named in ``exclude`` (``(tar path, key)``, see :func:`holdout_keys`) are never seen."""

    def __init__(
        self,
        name: str,
        tars: list[Path],
        seed: int,
        counter: BadDataCounter,
        rank: int = 0,
        world: int = 1,
        exclude: frozenset[tuple[str, str]] = frozenset(),
    ):
        if not tars:
            raise DataError(f"data source '{name}' has no tar files")
        self.name, self.all_tars, self.seed, self.counter = name, tars, seed, counter
        self.rank, self.world, self.exclude = rank, world, exclude
        self.epoch, self.shard, self.sample = 0, 0, 0
        self._it = None

    def _order(self) -> list[Path]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        tars = [self.all_tars[i] for i in torch.randperm(len(self.all_tars), generator=g).tolist()]
        return tars[self.rank :: self.world] if len(tars) >= self.world else tars

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample}

    def load_state(self, state: dict) -> None:
        self.epoch, self.shard, self.sample = state["epoch"], state["shard"], state["sample"]
        self._it = None

    def _samples(self):
        """From the current position on: (index in shard, raw tar sample)."""
        while True:
            order = self._order()
            while self.shard < len(order):
                tar, skip = order[self.shard], self.sample
                try:
                    for i, raw in enumerate(iter_tar_samples(tar)):
                        if i >= skip:
                            yield i, (None if (str(tar), raw.get("__key__")) in self.exclude else raw)
                except (OSError, tarfile.TarError) as e:
                    self.counter.add_bad(f"{tar}: unreadable tar ({type(e).__name__}: {e})")
                self.shard, self.sample = self.shard + 1, 0
            self.epoch, self.shard = self.epoch + 1, 0

    def next(self) -> RawSample:
        if self._it is None:
            self._it = self._samples()
        for i, raw in self._it:
            self.sample = i + 1
            if raw is None or (len(self.all_tars) < self.world and i % self.world != self.rank):
                continue  # held out, or another worker's
            sample = decode_raw(self.name, raw, self.counter)
            if sample is not None:
                self.counter.good += 1
                return sample
        raise DataError(f"source {self.name} ended")  # unreachable: the generator cycles


def decode_raw(source: str, raw: dict, counter: BadDataCounter) -> RawSample | None:
    """One raw tar sample of ``source`` decoded and checked (``ours`` must be labelled); a bad one
    is counted with its key and gives None."""
    try:
        return _decode_or_raise(source, raw)
    except Exception as e:  # noqa: BLE001 -- any failure of one sample is counted, not fatal
        counter.add_bad(f"{source}:{raw.get('__key__', '?')}: {type(e).__name__}: {e}")
        return None


def _checked_meta(source: str, raw: dict) -> tuple[dict, np.ndarray | None]:
    meta, emb = decode_sample(raw)
    errs = validate_sample(meta, emb, labelled=source == "ours")
    if errs:
        raise ValueError(errs[0])
    return meta, emb


def _decode_or_raise(source: str, raw: dict) -> RawSample:
    meta, emb = _checked_meta(source, raw)
    jpg = raw.get("jpg") or raw.get("jpeg") or raw.get("png")
    image = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    if image.shape[:2] != (int(meta["image"]["height"]), int(meta["image"]["width"])):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]}, JSON says "
            f"{meta['image']['width']}x{meta['image']['height']}"
        )
    return RawSample(raw.get("__key__", "?"), image, meta, emb, source)


HOLDOUT_SHARE = 1 / 8  # samples are held out of training only from data at least 1 / this as large


def first_good_keys(tars: list[Path], n: int, source: str = "ours") -> list[tuple[str, str]]:
    """``(tar path, key)`` of the first ``n`` samples of ``source`` in the tars' sorted order whose
    JSON is valid (fewer if there are fewer; images are not decoded here). Bad samples and
    unreadable tars are passed over; training counts them."""
    keys: list[tuple[str, str]] = []
    for tar in sorted(tars, key=str):
        if len(keys) >= n:
            break
        try:
            for raw in iter_tar_samples(tar):
                try:
                    _checked_meta(source, raw)
                except Exception:  # noqa: BLE001,S112 -- a bad sample is not picked; training counts it
                    continue
                keys.append((str(tar), raw.get("__key__", "?")))
                if len(keys) >= n:
                    break
        except (OSError, tarfile.TarError):
            continue
    return keys


def holdout_keys(tars: list[Path], n: int, source: str = "ours") -> list[tuple[str, str]]:
    """The samples kept out of training for a fit on unseen data (the predicted-IoU calibration):
    the first ``n`` good samples in sorted order, when there are at least ``n / HOLDOUT_SHARE``
    (only that many are read to find out); none from smaller data. On a few hundred images
    trained for many epochs, what holding out takes from training costs the model about what
    the unseen fit gains (docs/TRAINING.md), so small data is fitted on training images."""
    keys = first_good_keys(tars, math.ceil(n / HOLDOUT_SHARE), source)
    return keys[:n] if len(keys) >= math.ceil(n / HOLDOUT_SHARE) else []


def held_out_samples(source: str, keys: list[tuple[str, str]], counter: BadDataCounter):
    """The samples of ``source`` that :func:`holdout_keys` named, decoded and checked as training's
    are (a bad one is counted and skipped), in their order."""
    wanted = set(keys)
    for tar in dict.fromkeys(t for t, _ in keys):
        try:
            for raw in iter_tar_samples(tar):
                if (tar, raw.get("__key__")) in wanted:
                    sample = decode_raw(source, raw, counter)
                    if sample is not None:
                        yield sample
        except (OSError, tarfile.TarError) as e:
            counter.add_bad(f"{tar}: unreadable tar ({type(e).__name__}: {e})")


class MixedSource:
    """Picks a source per sample with probability proportional to ``mix`` (a checkpointed generator)."""

    def __init__(self, sources: dict[str, TarSource], mix: dict[str, float], seed: int):
        self.sources = {k: v for k, v in sources.items() if mix.get(k, 0) > 0}
        if not self.sources:
            raise DataError("no data: data.shards and data.sa1b are empty or weighted 0")
        self.names = list(self.sources)
        self.weights = torch.tensor([mix[n] for n in self.names], dtype=torch.float64)
        self.rng = torch.Generator().manual_seed(seed)

    def next(self) -> RawSample:
        i = int(torch.multinomial(self.weights, 1, generator=self.rng))
        return self.sources[self.names[i]].next()

    def state(self) -> dict:
        return {"generator": self.rng.get_state(), "sources": {n: s.state() for n, s in self.sources.items()}}

    def load_state(self, state: dict) -> None:
        self.rng.set_state(state["generator"])
        for n, s in state["sources"].items():
            if n in self.sources:
                self.sources[n].load_state(s)


@dataclass
class Example:
    """One image prepared for the model: inputs in the padded ``S x S`` frame, low-res targets."""

    image: torch.Tensor  # 3xSxS float, normalised and padded (SAM's preprocess)
    boxes_xyxy: torch.Tensor  # Mx4 in the input frame
    points_xy: torch.Tensor  # Mx2 in the input frame
    use_box: torch.Tensor  # M bool
    target_masks: torch.Tensor  # MxLxL float {0,1}, L = low-res side
    labels: list[str | None]
    crop_emb: torch.Tensor | None  # MxD float32 (our shards) or None
    key: str
    background_xy: torch.Tensor | None = None  # Bx2 points on no annotated mask, input frame
    candidates: list[str] | None = None  # the names the labeller chose among (our shards; None: SA-1B)


@dataclass(frozen=True)
class Layout:
    """Where one training image sits on the encoder's ``size x size`` input: resized to
    ``nh x nw``, mirrored left-right if ``flip``, its top-left corner at ``(oy, ox)`` (negative:
    the input shows a window of a larger image). Image, masks, points and boxes all go through it.

    ``scale = 1`` without flip is SAM's own ``preprocess`` layout: longest side = ``size``, top-left,
    padded bottom-right (what prediction sees).
    """

    size: int
    nh: int
    nw: int
    oy: int = 0
    ox: int = 0
    flip: bool = False

    @staticmethod
    def draw(h: int, w: int, size: int, cfg, g: torch.Generator) -> Layout:
        """A random layout for an ``h x w`` image: the longest side scaled to ``size`` times a factor
        drawn uniformly from ``cfg.scale_range`` (large-scale jitter), a uniform position on the input
        (or window of the image, when it is larger), mirrored with chance ``cfg.hflip_prob``."""
        lo, hi = cfg.scale_range
        r = torch.rand(4, generator=g).tolist()
        s = size * (lo + (hi - lo) * r[0]) / max(h, w)
        nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))  # ResizeLongestSide's rounding

        def offset(n: int, u: float) -> int:
            if lo == hi == 1:  # no jitter: SAM's layout, top-left
                return 0
            return int(u * (size - n + 1)) if n <= size else -int(u * (n - size + 1))

        return Layout(size, nh, nw, offset(nh, r[1]), offset(nw, r[2]), r[3] < cfg.hflip_prob)

    @property
    def visible(self) -> tuple[int, int, int, int]:
        """``x0, y0, x1, y1`` of the image's pixels on the input."""
        return (
            max(self.ox, 0),
            max(self.oy, 0),
            min(self.ox + self.nw, self.size),
            min(self.oy + self.nh, self.size),
        )

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """``C x nh x nw`` (already resized) -> ``C x size x size``, zeros where the image is not."""
        if self.flip:
            x = x.flip(-1)
        out = x.new_zeros(x.shape[0], self.size, self.size)
        x0, y0, x1, y1 = self.visible
        out[:, y0:y1, x0:x1] = x[:, y0 - self.oy : y1 - self.oy, x0 - self.ox : x1 - self.ox]
        return out

    def mask(self, m: np.ndarray) -> torch.Tensor:
        """A mask at the sample's resolution -> ``size x size`` float {0, 1} on the input."""
        t = torch.from_numpy(np.ascontiguousarray(m)).float()[None, None]
        return self.place(F.interpolate(t, size=(self.nh, self.nw), mode="nearest")[0])[0]

    def image(self, model, img: np.ndarray) -> torch.Tensor:
        """The sample's ``H x W x 3`` uint8 image -> the normalised ``3 x size x size`` input."""
        if (self.nh, self.nw) != img.shape[:2]:  # resized as ResizeLongestSide.apply_image does
            img = np.array(resize(to_pil_image(img), [self.nh, self.nw]))
        x = torch.as_tensor(img).permute(2, 0, 1).float()
        x = (x - model.pixel_mean.detach().cpu()) / model.pixel_std.detach().cpu()
        return self.place(x)


def prepare_example(sample: RawSample, model, cfg, g: torch.Generator) -> Example | None:
    """Lay the image out on the model's input (:class:`Layout`: resize, scale jitter, mirror), pick
    ``masks_per_image`` masks, sample a prompt for each.

    An image with fewer masks than that has some picked again, each time with a fresh prompt: the
    image is encoded once per step whatever the number of prompts, so prompts are cheap training.
    A mask the layout cuts away entirely (a window of a zoomed-in image) is not a target.
    """
    size = model.image_encoder.img_size
    layout = Layout.draw(*sample.image.shape[:2], size, cfg, g)
    image = layout.image(model, sample.image)
    anns = [(i, a) for i, a in enumerate(sample.meta["annotations"]) if a["area"] >= cfg.min_mask_area]
    if not anns:
        return None
    pick = torch.randperm(len(anns), generator=g)[: cfg.masks_per_image].tolist()
    if len(pick) < cfg.masks_per_image:  # few masks: prompt some again (a fresh point or box each)
        pick += torch.randint(len(anns), (cfg.masks_per_image - len(pick),), generator=g).tolist()
    low = size // 4
    vx0, vy0, vx1, vy1 = layout.visible
    boxes, points, masks, labels, rows = [], [], [], [], []
    for j in pick:
        i, ann = anns[j]
        m = layout.mask(decode_rle(ann["segmentation"]))
        ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
        if len(ys) == 0:
            continue
        k = int(torch.randint(len(ys), (1,), generator=g))
        points.append([float(xs[k]) + 0.5, float(ys[k]) + 0.5])
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1
        jit = (torch.rand(4, generator=g) * 2 - 1) * cfg.box_jitter * torch.tensor([x1 - x0, y1 - y0] * 2)
        boxes.append(
            [
                max(float(vx0), x0 + jit[0].item()),
                max(float(vy0), y0 + jit[1].item()),
                min(float(vx1), x1 + jit[2].item()),
                min(float(vy1), y1 + jit[3].item()),
            ]
        )
        masks.append(F.interpolate(m[None, None], size=(low, low), mode="area")[0, 0].gt(0.5).float())
        labels.append(ann.get("label"))
        rows.append(i)
    if not masks:
        return None
    n = len(masks)
    emb = torch.from_numpy(sample.emb[rows].astype(np.float32)) if sample.emb is not None else None
    background = background_points(sample, layout, cfg.background_points, g)
    return Example(
        image,
        torch.tensor(boxes),
        torch.tensor(points),
        torch.rand(n, generator=g) < cfg.box_prompt_prob,
        torch.stack(masks),
        labels,
        emb,
        sample.key,
        background,
        [c["label"] for c in sample.meta.get("candidates") or [] if c.get("label")] or None,
    )


def background_points(sample: RawSample, layout: Layout, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points (``Nx2`` XY, input frame) on image pixels no annotation covers; fewer if there
    are none.

    Automatic mode prompts a grid over the whole image, so most of its points land where no
    object is; a model only ever prompted inside objects has never learnt to score such masks low.
    """
    if n == 0:
        return torch.zeros(0, 2)
    segs = [a["segmentation"] for a in sample.meta["annotations"]]
    x0, y0, x1, y1 = layout.visible
    on_image = torch.zeros(layout.size, layout.size, dtype=torch.bool)
    on_image[y0:y1, x0:x1] = True
    if segs:  # the union in RLE form, decoded and laid out once (not once per annotation)
        union = mask_utils.merge([coco_rle(s) for s in segs])
        on_image &= layout.mask(mask_utils.decode(union)) < 0.5
    ys, xs = torch.nonzero(on_image, as_tuple=True)
    if len(ys) == 0:
        return torch.zeros(0, 2)
    k = torch.randint(len(ys), (n,), generator=g)
    return torch.stack([xs[k].float() + 0.5, ys[k].float() + 0.5], 1)
