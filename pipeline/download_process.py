"""The download process: img2dataset, started by :func:`ssam.pipeline.run.start_download`.

A module of its own so that the process imports only what fetching needs (img2dataset, the URL
guard, storage), not the models. ``python -m ssam.pipeline.download_process SPEC_JSON``.
"""

from __future__ import annotations

import json
import os
import sys

from ssam import storage, urlguard
from ssam.stages.download import DOWNLOAD_DONE, DownloadConfig, Downloader


def _download_process(
    cfg: dict, per_shard: int, image_size: int, input_parquet: str, folder: str, ray_address
):
    """The download process: img2dataset, then the done marker (with the error, if any)."""
    error = None
    try:
        runtime_env = None
        if not cfg.get("allow_private_hosts"):
            # every connection of every fetch, redirects included, is checked where it is made:
            # here, in img2dataset's spawned pool (the environment) and in its Ray tasks
            guard_env = urlguard.child_environment(cfg.get("allow_networks", ()))
            os.environ.update(guard_env)
            urlguard.install(cfg.get("allow_networks", ()))
            runtime_env = {"env_vars": guard_env}
        if cfg.get("distributor") == "ray":
            import ray

            ray.init(
                address=ray_address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env
            )
        Downloader(DownloadConfig(**cfg), per_shard, image_size)(input_parquet, folder)
    except BaseException as e:  # the driver raises it again from the marker
        error = f"{type(e).__name__}: {e}"
    storage.write_json(storage.join(folder, DOWNLOAD_DONE), {"error": error})


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    _download_process(
        spec["cfg"], spec["per_shard"], spec["image_size"], spec["input"], spec["folder"], spec["ray_address"]
    )
