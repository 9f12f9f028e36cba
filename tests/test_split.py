"""A target split by accelerate (`device_map`) stays lossless: here part of it is offloaded to disk,
which exercises accelerate's hooks on a CPU-only machine; on GPUs the same path spreads layers."""
import pytest

from mmspec import DecodeConfig, generate, load_drafter, load_target
from mmspec.model import last_layer_device
from tiny_models import image

PROMPT = "describe the image."


@pytest.fixture(scope="module")
def split_and_whole(tiny_dir, tmp_path_factory):
    whole = load_target(str(tiny_dir / "llava"))
    split = load_target(str(tiny_dir / "llava"), device_map="auto", max_memory={"cpu": "500KB"},
                        offload_folder=str(tmp_path_factory.mktemp("offload")))
    return split, whole


def test_the_target_really_is_split(split_and_whole):
    split, _ = split_and_whole
    placements = set(split.model.hf_device_map.values())
    assert placements == {"cpu", "disk"}, split.model.hf_device_map
    assert split.device.type == "cpu" and last_layer_device(split.model).type == "cpu"


@pytest.mark.parametrize("tree", ["chain:4", "dynamic:12,4,3"])
def test_split_target_is_lossless(split_and_whole, tiny_dir, tree):
    split, whole = split_and_whole
    ref = generate(whole, None, image(0), PROMPT, DecodeConfig(max_new_tokens=32))
    assert generate(split, None, image(0), PROMPT, DecodeConfig(max_new_tokens=32)).token_ids == ref.token_ids
    for name in [str(tiny_dir / "llava-draft"), str(tiny_dir / "text-draft"), "ngram"]:
        gen = generate(split, load_drafter(name, split), image(0), PROMPT, DecodeConfig(max_new_tokens=32, tree=tree))
        assert gen.token_ids == ref.token_ids, name


def test_feature_drafter_on_a_split_target(split_and_whole):
    from mmspec.drafters.feature.drafter import create_feature_drafter
    from mmspec.world import default_calibration

    split, whole = split_and_whole
    ref = generate(whole, None, image(1), PROMPT, DecodeConfig(max_new_tokens=24))
    gen = generate(split, create_feature_drafter("eagle", split, examples=default_calibration()), image(1), PROMPT,
                   DecodeConfig(max_new_tokens=24, tree="dynamic:8,3,2"))
    assert gen.token_ids == ref.token_ids
