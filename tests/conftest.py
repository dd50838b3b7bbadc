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
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: no update check
# Every Ray the tests start (in-process, Ray Train, the multi-node cluster) stays on 127.0.0.1:
# with this off, Ray resolves node addresses to loopback instead of the machine's interface.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def smoke_cfg(tmp_path):
    from ssam.pipeline.config import load_config

    return load_config(
        REPO / "configs/pipeline/smoke.yaml",
        [f"output.dir={tmp_path / 'run'}", f"input.path={REPO / 'sample/pairs.parquet'}"],
    )


@pytest.fixture(scope="module")
def ray_loopback():
    """An in-process Ray bound to 127.0.0.1 (the tests' servers stay on loopback); shut down after."""
    import ray

    ray.shutdown()
    ray.init(include_dashboard=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield
    ray.shutdown()
