"""``ssam-train``: train Semantic-SAM on our shards mixed with SA-1B.

    ssam-train configs/train/smoke.yaml --shards runs/smoke/shards --output runs/train-smoke
    ssam-train configs/train/smoke.yaml --shards runs/smoke/shards --output runs/train-smoke --resume
    ssam-train configs/train/vit_b.yaml --shards '/data/runs/laion/shards' --sa1b '/data/sa1b/*.tar' \\
        --output /data/train/vit_b --num-workers 8 --use-gpu          # Ray Train, data-parallel

Outputs in ``--output``: ``checkpoints/last.pt`` (what ``--resume`` reads: model, optimizer,
scheduler, RNG and data position), ``model.pt`` (the final model with its predicted-IoU
calibration, fitted after the last step: :func:`fit_iou_calibration`; what ``ssam-predict`` loads),
``metrics.jsonl``, ``tb/`` (TensorBoard), ``text_embeddings.pt`` (the label cache).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssam.device import bf16_autocast, resolve_device, use_bf16
from ssam.io import atomic_path
from ssam.weights import load_weights_file

from .amg import AmgSettings, MaskEngine
from .calibration import IouCalibration, best_match_ious
from .data import (
    HOLDOUT_SHARE,
    BadDataCounter,
    MixedSource,
    TarSource,
    first_good_keys,
    held_out_samples,
    holdout_keys,
    prepare_example,
    resolve_tars,
)
from .label_engine import TextEmbeddingCache
from .losses import mask_losses, named_outputs, semantic_losses
from .semantic_sam import (
    LOGIT_SCALE_MAX,
    build_semantic_sam,
    load_model,
    load_sam_weights,
    read_checkpoint,
    save_model,
)
from .train_config import TrainConfig

log = logging.getLogger("ssam.train")


def decay_groups(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable parameters split by rule: matrices (2-D and up: linear, conv and embedding weights)
    decay; vectors and scalars (biases, norm scales, the temperature ``logit_scale``) do not, as in
    open_clip and nanoGPT -- decaying a temperature or a norm scale pulls it towards 0 for no gain."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if p.ndim >= 2], [p for p in trainable if p.ndim < 2]


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1, then cosine decay to 0 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def training_data(
    cfg: TrainConfig,
    counter,
    seed: int,
    mix_seed: int,
    rank: int = 0,
    world: int = 1,
    held_out: HeldOut | None = None,
):
    """The config's shards and SA-1B tars as one :class:`MixedSource` (worker ``rank`` of ``world``'s
    part); ``seed`` orders our shards, ``seed + 1`` SA-1B's, ``mix_seed`` the mixing. The samples
    of ``held_out`` are never drawn."""
    sources = {}
    for name, specs, source_seed in (("ours", cfg.data.shards, seed), ("sa1b", cfg.data.sa1b, seed + 1)):
        if specs:
            exclude = frozenset(held_out.keys) if held_out and held_out.source == name else frozenset()
            sources[name] = TarSource(name, resolve_tars(specs), source_seed, counter, rank, world, exclude)
    return MixedSource(sources, cfg.data.mix, mix_seed)


@dataclass(frozen=True)
class HeldOut:
    """Samples of one training source (``ours`` or ``sa1b``) kept out of training for the IoU
    calibration fit: ``(tar path, key)`` pairs, from :func:`holdout_keys`."""

    source: str
    keys: tuple[tuple[str, str], ...]


def calibration_holdout(cfg: TrainConfig) -> HeldOut | None:
    """What training leaves out for the calibration: the first ``train.calibration_images`` samples
    of our shards (of SA-1B's when ours are not mixed in), when there are at least 8 times as
    many (:func:`holdout_keys`). None when the calibration reads ``data.calibration_shards``, is
    off, or ``calibration_holdout`` is false; no keys on smaller data. Every worker computes the
    same set (it depends on the files only), and so does ``--resume``."""
    t, d = cfg.train, cfg.data
    if t.calibration_images == 0 or not t.calibration_holdout or d.calibration_shards:
        return None
    for name, specs in (("ours", d.shards), ("sa1b", d.sa1b)):
        if specs and d.mix.get(name, 0) > 0:
            return HeldOut(name, tuple(holdout_keys(resolve_tars(specs), t.calibration_images, name)))
    return None


class Trainer:
    """One training process (or one Ray Train worker, ``rank`` of ``world``)."""

    def __init__(self, cfg: TrainConfig, output: Path, rank: int = 0, world: int = 1, wrap=None, device=None):
        from .clip import load_clip

        self.cfg, self.output, self.rank, self.world = cfg, Path(output), rank, world
        t = cfg.train
        self.device = resolve_device(device or t.device)
        torch.manual_seed(cfg.seed + rank)
        m = cfg.model
        self.clip = load_clip(m.clip_model, m.clip_pretrained, seed=m.seed, device="cpu")
        self.clip_info = dict(self.clip.provenance)
        self.core = self._build_model().to(self.device)
        for name in t.freeze:
            for p in getattr(self.core, name).parameters():
                p.requires_grad_(False)
        self.net = wrap(self.core) if wrap else self.core
        decay, no_decay = decay_groups(self.core)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t.warmup_steps, t.max_steps))
        self.counter = BadDataCounter(cfg.data.max_bad_fraction)
        self.held_out = calibration_holdout(cfg)
        self.data = training_data(
            cfg, self.counter, cfg.seed, cfg.seed + 7 * rank, rank, world, held_out=self.held_out
        )
        self.rng = torch.Generator().manual_seed(cfg.seed * 31 + rank)
        self.text = TextEmbeddingCache(
            self.clip, path=self.output / "text_embeddings.pt" if rank == 0 else None
        )
        self.step = 0

    def _build_model(self):
        m = self.cfg.model
        if m.init_checkpoint:
            model, payload = load_model(m.init_checkpoint)
            if payload["model_config"]["clip_dim"] != self.clip.embed_dim:
                raise ValueError(
                    f"{m.init_checkpoint}: label space is {payload['model_config']['clip_dim']}-d, "
                    f"CLIP {m.clip_model} is {self.clip.embed_dim}-d"
                )
            return model.train()
        model = build_semantic_sam(m.size, self.clip.embed_dim, seed=m.seed)
        from .sam import resolve_sam_checkpoint

        path = None if m.random_init else resolve_sam_checkpoint(m.size, m.sam_checkpoint)
        if path is not None:
            load_sam_weights(model, load_weights_file(path, f"SAM {m.size} checkpoint"), path)
        return model.train()

    # ------------------------------------------------------------------------------------------

    def _batch(self):
        examples = []
        while len(examples) < self.cfg.train.batch_size:
            ex = prepare_example(self.data.next(), self.core, self.cfg.data, self.rng)
            if ex is not None:
                examples.append(ex)
        return examples

    def _autocast(self):
        """bf16 autocast for the forward: on CUDA (``train.bf16``), on a CPU with AVX512-BF16 or AMX
        when ``train.cpu_bf16`` asks (a vit_b step x2.2-2.4 faster there; the smoke model's is slower)."""
        t = self.cfg.train
        return bf16_autocast(self.device, use_bf16(self.device, t.bf16, t.cpu_bf16))

    @staticmethod
    def _crop_embeddings(examples, order, dim: int) -> torch.Tensor:
        """CLIP crop embeddings of all targets in output order; NaN rows where a sample has none
        (SA-1B, or a shard written by a CLIP of another width)."""
        rows = []
        for e, o in zip(examples, order, strict=True):
            ok = e.crop_emb is not None and e.crop_emb.shape[1] == dim
            rows.append(e.crop_emb[o] if ok else torch.full((len(o), dim), float("nan")))
        return torch.cat(rows)

    def train_step(self) -> dict:
        """One optimizer step on one batch; returns its metrics."""
        t, dev = self.cfg.train, self.device
        examples = self._batch()
        images = torch.stack([e.image for e in examples]).to(dev)
        prompts, order = [], []
        for e in examples:
            box_idx, pt_idx = torch.nonzero(e.use_box).flatten(), torch.nonzero(~e.use_box).flatten()
            bg = e.background_xy if e.background_xy is not None else torch.zeros(0, 2)
            prompts.append((e.boxes_xyxy[box_idx].to(dev), torch.cat([e.points_xy[pt_idx], bg]).to(dev)))
            order.append(torch.cat([box_idx, pt_idx]))
        with self._autocast():
            outputs, scale = self.net(images, prompts)
        # Outputs come boxes first, then target points, then background points: targets in that order.
        n_t = [len(o) for o in order]
        masks = torch.cat([o[0][:n, 1:] for o, n in zip(outputs, n_t, strict=True)]).float()  # outputs 1..3
        ious, sems, scores = (
            torch.cat([o[i][:n, 1:] for o, n in zip(outputs, n_t, strict=True)]).float() for i in (1, 2, 3)
        )
        bg_iou = torch.cat([o[1][n:, 1:] for o, n in zip(outputs, n_t, strict=True)]).float()
        targets = torch.cat([e.target_masks[o] for e, o in zip(examples, order, strict=True)]).to(dev)
        labels = [e.labels[i] for e, o in zip(examples, order, strict=True) for i in o.tolist()]
        mask_loss, iou_loss, best, best_iou, out_ious = mask_losses(
            masks, ious, targets, t.focal_weight, t.dice_weight
        )
        if len(bg_iou):  # background prompts: no object to segment, so every output's IoU target is 0
            iou_loss = (iou_loss * len(ious) + bg_iou.square().mean() * len(bg_iou)) / (
                len(ious) + len(bg_iou)
            )
        loss = mask_loss + t.iou_weight * iou_loss
        metrics = {
            "mask_loss": mask_loss.item(),
            "iou_loss": iou_loss.item(),
            "mask_iou": best_iou.mean().item(),
            # the IoU head against the truth on the trained (best) outputs; ssam-eval measures all masks
            "iou_pred_error": (ious.gather(1, best[:, None])[:, 0] - best_iou).abs().mean().item(),
            "temperature": scale.item(),
        }
        lab_rows = [i for i, lab in enumerate(labels) if lab]
        if lab_rows:
            labelled = torch.tensor(lab_rows, device=dev)
            sub, outs = named_outputs(best[labelled], out_ious[labelled], t.semantic_min_iou)
            rows = labelled[sub]  # a labelled mask once per output that learns its name
            sem = sems[rows, outs]
            score = scores[rows, outs]
            # Classes of the contrastive loss: the batch's labels plus its images' candidates (the
            # names the labeller chose among), so that a step with one label still has negatives
            # and the softmax is over the names a mask could have had, as at prediction time.
            cands = [c for e in examples for c in e.candidates or []]
            distinct = list(dict.fromkeys([labels[i] for i in lab_rows] + cands))
            text = torch.from_numpy(self.text.get(distinct)).to(dev)
            crop = self._crop_embeddings(examples, order, text.shape[1])[rows.cpu()].to(dev)
            con, sc, acc = semantic_losses(
                sem,
                score,
                [labels[i] for i in rows.tolist()],
                text,
                {lab: j for j, lab in enumerate(distinct)},
                scale,
                crop,
            )
            loss = loss + t.semantic_weight * con + t.score_weight * sc
            metrics.update(semantic_loss=con.item(), score_loss=sc.item(), label_acc=acc.item())
        # Zero-weighted use of every output: each parameter the forward touched gets a gradient
        # (zeros where unused this step), so DDP never waits for one that will not come.
        loss = loss + 0.0 * (scale + sum(t.float().sum() for out in outputs for t in out))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.core.parameters() if p.requires_grad], t.grad_clip
            )
        self.opt.step()
        with torch.no_grad():  # CLIP's cap on the temperature, on the parameter: gradients always flow
            self.core.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
        self.sched.step()
        self.step += 1
        metrics.update(
            step=self.step,
            loss=loss.item(),
            lr=self.sched.get_last_lr()[0],
            labelled_masks=len(lab_rows),
            masks=len(labels),
            bad_samples=self.counter.bad,
        )
        return metrics

    # ------------------------------------------------------------------------------------------

    def train_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "example_rng": self.rng.get_state(),
            "data": self.data.state(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def save_checkpoint(self, path: Path) -> None:
        save_model(path, self.core, self.clip_info, extra={"train_state": self.train_state()})
        self.text.save()

    def load_checkpoint(self, path: Path) -> None:
        payload = read_checkpoint(path)
        state = payload.get("train_state")
        if state is None:
            raise ValueError(f"{path}: a final model, not a training checkpoint (no optimizer state)")
        self.core.load_state_dict(payload["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.rng.set_state(state["example_rng"])
        self.data.load_state(state["data"])
        self.step = state["step"]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def fit(trainer: Trainer, resume: bool, report=None, progress: bool = True) -> Path:
    """The loop: steps, logs, checkpoints every ``checkpoint_every``, final ``model.pt`` (rank 0)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    t, out, lead = trainer.cfg.train, trainer.output, trainer.rank == 0
    last = out / "checkpoints" / "last.pt"
    if resume:
        if not last.exists():
            raise FileNotFoundError(f"--resume: {last} does not exist")
        trainer.load_checkpoint(last)
    metrics_path = out / "metrics.jsonl"
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _truncate_metrics(metrics_path, trainer.step)
        else:
            metrics_path.unlink(missing_ok=True)
    writer = SummaryWriter(str(out / "tb")) if lead else None
    bar = tqdm(total=t.max_steps, initial=trainer.step, disable=not (lead and progress), desc="train")
    while trainer.step < t.max_steps:
        m = trainer.train_step()
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", iou=f"{m['mask_iou']:.2f}")
        if trainer.step % t.log_every == 0 or trainer.step == t.max_steps:
            if lead:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                for k, v in m.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, trainer.step)
            if report is not None:
                report(m)
        if lead and (trainer.step % t.checkpoint_every == 0 or trainer.step == t.max_steps):
            trainer.save_checkpoint(last)
    bar.close()
    final = out / "model.pt"
    if lead:
        writer.close()
        calibration = fit_iou_calibration(trainer, t.calibration_images)
        save_model(
            final,
            trainer.core,
            trainer.clip_info,
            extra={
                "train_config": trainer.cfg.model_dump(mode="json"),
                "steps": trainer.step,
                "predict_defaults": trainer.cfg.predict.model_dump(),
                "iou_calibration": calibration.to_dict() if calibration else None,
            },
        )
    return final


def calibration_samples(trainer: Trainer, images: int):
    """The samples the IoU calibration fits on, and what they are: ``("calibration_shards", ...)``,
    the first ``images`` of ``data.calibration_shards``; ``("held-out", ...)``, the samples training
    left out (:func:`calibration_holdout`); or ``("training", ...)``, ``images`` training samples
    drawn afresh (holdout off, or data too small to hold any out)."""
    cfg = trainer.cfg
    counter = BadDataCounter(1.0)  # a bad sample is counted and passed over, never fatal here
    if cfg.data.calibration_shards:
        keys = first_good_keys(resolve_tars(cfg.data.calibration_shards), images, "calibration")
        return "calibration_shards", held_out_samples("calibration", keys, counter)
    held = trainer.held_out
    if held is not None and held.keys:
        return "held-out", held_out_samples(held.source, list(held.keys), counter)
    if held is not None:
        log.info(
            "IoU calibration: fewer than %d good samples, none held out of training; fitting on"
            " training images",
            math.ceil(images / HOLDOUT_SHARE),
        )
    # the training data, in another order than training's
    data = training_data(cfg, counter, cfg.seed + 1000, cfg.seed + 1000)
    return "training", (data.next() for _ in range(images))


def fit_iou_calibration(trainer: Trainer, images: int) -> IouCalibration | None:
    """Fit the predicted-IoU calibration (:mod:`ssam.model.calibration`) of the trained model: automatic
    mode, with the predict section's stability threshold and no IoU threshold (the map must cover
    every raw value), on up to ``images`` samples that :func:`calibration_samples` picks (by default
    ones training never saw), each mask's raw predicted IoU paired with its IoU against the
    sample's best-matching annotation."""
    if images == 0:
        return None
    cfg = trainer.cfg
    source, samples = calibration_samples(trainer, images)
    model = trainer.core.eval()
    model.iou_calibration = None  # raw head (a model started from one of our checkpoints has one)
    settings = AmgSettings(  # one pass over a few dozen images: compiling would not pay back
        pred_iou_thresh=0.0,
        stability_score_thresh=cfg.predict.stability_score_thresh,
        compile_encoder=False,
        compile_decoder=False,
    )
    engine = MaskEngine(model, settings)
    predicted, stability, true = [], [], []
    used = 0
    for sample in samples:
        [res] = engine.generate([sample.image])
        predicted += [r["predicted_iou"] for r in res.records]
        stability += [r["stability_score"] for r in res.records]
        true += best_match_ious(res.records, sample.meta.get("annotations") or []).tolist()
        used += 1
    model.train()
    cal = IouCalibration.fit(np.array(predicted), np.array(true), np.array(stability), used, source)
    if cal is None:
        log.warning(
            "IoU calibration: automatic mode found no mask on %d %s images; none written", used, source
        )
    else:
        log.info(
            "IoU calibration on %d masks of %d %s images (stability weight %.1f): "
            "mean |predicted - true IoU| %.3f raw, %.3f calibrated",
            cal.masks,
            used,
            source,
            cal.stability_weight,
            cal.error_before,
            cal.error_after,
        )
    return cal


def show_training_log() -> None:
    """Warnings from everything, and this module's own lines (the IoU calibration's summary), on
    stderr: what ``ssam-train`` and its Ray workers print."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)


def _ray_worker(config: dict) -> None:
    """Ray Train worker: DDP over the workers, rank 0 writes checkpoints and the final model."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    cfg = TrainConfig.model_validate(config["cfg"])
    show_training_log()

    def wrap(model):
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    trainer = Trainer(
        cfg,
        Path(config["output"]),
        ctx.get_world_rank(),
        ctx.get_world_size(),
        wrap=wrap,
        device=ray.train.torch.get_device(),
    )
    fit(trainer, config["resume"], report=lambda m: ray.train.report(m), progress=False)


def ray_scaling(num_workers: int, use_gpu: bool, gpus_per_worker: float = 1.0):
    """Ray Train's ``ScalingConfig`` and ``TorchConfig`` for ``num_workers`` workers.

    ``gpus_per_worker`` below 1 lets workers share a GPU (two on one card at 0.5). NCCL refuses two
    ranks on one device, so DDP then runs over gloo, which reduces CUDA tensors too; with whole
    GPUs it is Ray's default for GPUs, NCCL.

    Raises:
        ValueError: ``gpus_per_worker`` not positive, or above 1 and not a whole number (what Ray
            can schedule).
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    if num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {num_workers}")
    if gpus_per_worker <= 0 or (gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker)):
        raise ValueError(f"--gpus-per-worker must be in (0, 1] or a whole number, got {gpus_per_worker}")
    resources = {"GPU": gpus_per_worker} if use_gpu else None
    shared = use_gpu and gpus_per_worker < 1
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources)
    return scaling, TorchConfig(backend="gloo") if shared else TorchConfig()


def train_with_ray(
    cfg: TrainConfig,
    output: Path,
    resume: bool,
    num_workers: int,
    use_gpu: bool,
    gpus_per_worker: float = 1.0,
) -> Path:
    """Data-parallel training on Ray Train's ``TorchTrainer`` (one machine or a cluster)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    scaling, torch_config = ray_scaling(num_workers, use_gpu, gpus_per_worker)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "output": str(output.resolve()),
            "resume": resume,
        },
        scaling_config=scaling,
        torch_config=torch_config,
        run_config=RunConfig(name="ssam-train", storage_path=str((output / "ray").resolve())),
    )
    trainer.fit()
    return output / "model.pt"
