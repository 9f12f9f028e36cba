"""mmspec: lossless speculative decoding for Hugging Face vision-language models, with traces.

Public API: load a target, pick a drafter, decode; every step is recorded in plain dataclasses.

    target = load_target("assets/models/mmspec-target")
    drafter = load_drafter("ngram", target)
    gen = generate(target, drafter, "cat.png", "Describe the image.", DecodeConfig(tree="chain:4"))
"""
from mmspec.drafters.base import Drafter
from mmspec.drafters.model import ModelDrafter
from mmspec.drafters.ngram import NgramDrafter
from mmspec.drafters.noise import RandomDrafter
from mmspec.drafters.registry import load_drafter
from mmspec.engine import DecodeConfig, Decoder, generate
from mmspec.errors import InputError
from mmspec.load import Target, load_image, load_target
from mmspec.trace import DraftTree, Generation, Stats, StepRecord, load_trace, save_trace
from mmspec.tree import TreeSpec, parse_tree_spec
from mmspec.verify import Sampling

__all__ = [
    "DecodeConfig", "Decoder", "DraftTree", "Drafter", "Generation", "InputError", "ModelDrafter", "NgramDrafter",
    "RandomDrafter", "Sampling", "Stats", "StepRecord", "Target", "TreeSpec", "generate", "load_drafter",
    "load_image", "load_target", "load_trace", "parse_tree_spec", "save_trace",
]
