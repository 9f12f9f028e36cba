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

# Single parametrizations over ~20 s on a busy 2-core CPU (measured 24-53 s there), marked slow here
# rather than by splitting their parametrize lists. The quick tier (`-m "not slow"`) keeps their
# chain and static combinations for both families (dynamic trees stay covered there by the EOS,
# max_new_tokens, cache and feature-drafter tests); the full suite runs all.
_STATIC = "static:[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[0,1,0],[0,0,0,0]]"
SLOW_CASES = {
    "test_lossless.py::test_greedy_speculative_equals_vanilla[dynamic:16,5,3-llava]",
    "test_lossless.py::test_greedy_speculative_equals_vanilla[dynamic:16,5,3-qwen2vl]",
    "test_lossless.py::test_static_cache_fast_path_is_lossless[chain:4-llava]",
    f"test_lossless.py::test_static_cache_fast_path_is_lossless[{_STATIC}-llava]",
    "test_lossless.py::test_static_cache_fast_path_is_lossless[dynamic:16,5,3-llava]",
    "test_lossless.py::test_static_cache_fast_path_is_lossless[dynamic:16,5,3-qwen2vl]",
    "test_lossless.py::test_padded_forwards_of_the_graph_path_are_lossless",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_CASES:  # run from the root or from tests/
            item.add_marker(pytest.mark.slow)


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
