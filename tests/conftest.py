import os
from pathlib import Path

import pytest
import torch

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get("SPARSE_RUNTIME_DATA") and _SHARED.is_dir():
    os.environ["SPARSE_RUNTIME_DATA"] = str(_SHARED)
os.environ.setdefault("SPARSE_RUNTIME_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def family_name(request):
    return request.param


@pytest.fixture
def data_dir():
    d = os.environ.get("SPARSE_RUNTIME_DATA")
    if not d or not Path(d).is_dir():
        pytest.skip("SPARSE_RUNTIME_DATA does not point at the shared data")
    return Path(d)
