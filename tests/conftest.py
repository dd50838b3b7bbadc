import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside this file

# Offline, with a private weights cache -- set before any test module imports huggingface_hub,
# which reads HF_HUB_OFFLINE once, at import.
_CACHE = tempfile.mkdtemp(prefix="ssam-test-cache-")
os.environ.update(SSAM_CACHE=_CACHE, SSAM_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=os.path.join(_CACHE, "hf"))
os.environ.setdefault(
    "NO_ALBUMENTATIONS_UPDATE", "1"
)  # img2dataset imports albumentations, which phones home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def smoke_cfg(tmp_path):
    from ssam.pipeline.config import load_config

    return load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [f"output.dir={tmp_path / 'run'}", f"input.path={REPO / 'sample/pairs.parquet'}"],
    )
