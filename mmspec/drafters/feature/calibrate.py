"""Calibration of a feature drafter built without training: the target's attention-entropy
profile (see mmspec.entropy) over (image, prompt) examples the caller hands in. Nothing here knows
the synthetic world (`mmspec.world.default_calibration` makes examples from it)."""
from __future__ import annotations

import torch

from mmspec.drafters.feature.plan import image_span


@torch.no_grad()
def calibrate_entropy(target, examples) -> list[float]:
    """Entropy profile of the target (see mmspec.entropy) over post-image text positions of prompts;
    examples: (image, prompt) pairs, at least one."""
    from mmspec import entropy
    from mmspec.model import CachedModel

    if not examples:
        raise ValueError("calibrate_entropy needs (image, prompt) examples, e.g. mmspec.world.default_calibration()")
    image_id = target.family.media_token_ids(target.model.config)
    acc = None
    for img, prompt in examples:
        cm = CachedModel(target.model, target.family)
        inputs = target.family.prefill_inputs(target.processor, img, prompt)
        _, hs = cm.prefill(inputs, hidden=True)
        ids = inputs["input_ids"][0].tolist()
        span = image_span(ids, image_id)
        T = len(ids)
        start = span[0] + span[1] if span else 1
        qmask = torch.zeros(1, T, dtype=torch.bool)
        qmask[0, start:] = True
        pos = target.family.prefill_position_ids(target.model, inputs)
        if pos is None:
            pos = target.family.position_ids(torch.arange(T), 0)
        pos = pos.to(target.device)
        keys = [layer.keys for layer in cm.cache.layers]
        prof = entropy.entropy_profile(target.model, hs, keys, pos, qmask)
        acc = prof if acc is None else [a + b for a, b in zip(acc, prof)]
    return [a / len(examples) for a in acc]
