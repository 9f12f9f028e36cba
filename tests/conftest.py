"""Session fixtures: tiny models saved once per test session in a temp dir (see tiny_models.py)."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tiny_models  # noqa: E402

DEVICE = os.environ.get("MMSPEC_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("MMSPEC_TEST_DTYPE", "float32")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tiny_models.build_llava(root / "llava", seed=0)
    tiny_models.build_llava(root / "llava-draft", seed=1, layers=1, hidden=32)
    tiny_models.build_qwen2_vl(root / "qwen2vl", seed=2)
    tiny_models.build_text_lm(root / "text-draft", seed=3)
    tiny_models.build_llava(root / "llava-peaky", seed=4, peaky=12.0)
    tiny_models.build_llava(root / "llava-peaky-draft", seed=4, peaky=12.0, noise=0.5)
    tiny_models.build_text_lm(root / "foreign-text", seed=5, vocab_size=350)
    return root
