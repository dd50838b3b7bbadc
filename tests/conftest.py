import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _offline_cache(tmp_path_factory):
    """Every test runs offline with a private weights cache: nothing is fetched from a hub."""
    cache = tmp_path_factory.mktemp("ssam-cache")
    old = {k: os.environ.get(k) for k in ("SSAM_CACHE", "SSAM_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME")}
    os.environ.update(SSAM_CACHE=str(cache), SSAM_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(cache / "hf"))
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def smoke_cfg(tmp_path):
    from ssam.pipeline.config import load_config

    return load_config(REPO / "configs/pipeline/smoke.yaml", [f"output.dir={tmp_path / 'run'}",
                                                               f"input.path={REPO / 'sample/pairs.parquet'}"])
