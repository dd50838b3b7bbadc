"""Before any work: are the models' weights here (or fetchable)? Say so in one paragraph if not.

Real weights are fetched once into the cache here; the stages later load them from there.
Nothing falls back to the smoke models.
"""

from __future__ import annotations

import os

from ssam.format import PIPELINE_VERSION
from ssam.weights import WeightsUnavailable, cache_dir, offline, sha256_file

from .config import PipelineConfig


class ModelsUnavailable(RuntimeError):
    """One or more models cannot be loaded; the message says which, why, and what to do."""


def _sam(cfg: PipelineConfig) -> dict:
    from ssam.model.sam import resolve_sam_checkpoint

    path = resolve_sam_checkpoint(cfg.masks.sam_model, cfg.masks.sam_checkpoint)
    return {
        "name": cfg.masks.sam_model,
        "checkpoint": path,
        "checkpoint_sha256": sha256_file(path) if path else None,
    }


def _clip(cfg: PipelineConfig) -> dict:
    import open_clip

    from ssam.model.clip import resolve_clip_weights

    name, tag = cfg.labels.clip_model, cfg.labels.clip_pretrained
    resolve_clip_weights(name, tag)
    return {"name": name, "pretrained": tag, "embed_dim": open_clip.get_model_config(name)["embed_dim"]}


def _llm(cfg: PipelineConfig) -> dict:
    c = cfg.candidates
    prov = {"backend": c.backend, "model": c.llm_model if c.backend != "none" else None}
    if c.backend == "none" or c.llm_model == "smoke" or os.path.isdir(os.path.expanduser(c.llm_model)):
        return prov
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            c.llm_model,
            local_files_only=offline(),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
        )
    except Exception as e:  # noqa: BLE001 -- as above
        raise WeightsUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    return prov


def _resolves(host: str, timeout_s: float = 5.0) -> bool:
    """Does ``host`` resolve within ``timeout_s``? (A machine without network answers at once.)"""
    import concurrent.futures
    import socket

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            return bool(pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_s))
        except (OSError, concurrent.futures.TimeoutError):
            return False


def _hub_offline_if_unreachable() -> None:
    """Without a reachable Hugging Face Hub, make its client answer from the cache at once
    instead of retrying for a minute (it reads HF_HUB_OFFLINE at import; set both)."""
    if offline() or _resolves("huggingface.co"):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["SSAM_OFFLINE_REASON"] = "there is no network (huggingface.co does not resolve)"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def check_models(cfg: PipelineConfig) -> dict:
    """Provenance of the three models, after making sure each can be loaded.

    Raises:
        ModelsUnavailable: one paragraph naming every missing model, where its files go,
            and how to run the smoke models instead.
    """
    prov: dict = {}
    missing: list[str] = []
    _hub_offline_if_unreachable()
    for key, fn, what in (
        ("sam", _sam, f"SAM {cfg.masks.sam_model}"),
        ("clip", _clip, f"CLIP {cfg.labels.clip_model}/{cfg.labels.clip_pretrained}"),
        ("llm", _llm, f"LLM {cfg.candidates.llm_model} ({cfg.candidates.backend})"),
    ):
        try:
            prov[key] = fn(cfg)
        except (WeightsUnavailable, KeyError, OSError) as e:
            missing.append(str(e) if str(e).startswith(what) else f"{what}: {e}")
    if missing:
        raise ModelsUnavailable(
            "Cannot start: model weights are missing. "
            + " ".join(f"[{m}]" for m in missing)
            + f" Weights are fetched once (SAM from dl.fbaipublicfiles.com, CLIP and the LLM from the Hugging Face"
            f" Hub) into {cache_dir()} and ~/.cache/huggingface, and are reused offline afterwards. Without"
            " network access, copy the files there, or point masks.sam_checkpoint at a sam_vit_*.pth file,"
            " labels.clip_pretrained at an open_clip checkpoint file and candidates.llm_model at a local model"
            " directory. To try the pipeline with no weights at all, run `make demo SMOKE=1` (tiny random"
            " models; the output is marked smoke and means nothing)."
        )
    prov["smoke"] = cfg.smoke
    prov["pipeline_version"] = PIPELINE_VERSION
    return prov
