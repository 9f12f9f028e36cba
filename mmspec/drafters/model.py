"""ModelDrafter: an independent Hugging Face model with the target's tokenizer, either a small VLM
that sees the image or a text-only causal LM that does not; it keeps its own KV cache and, on the
fast path, drafts chains and dynamic trees on the device. Also how a model directory or hub id is
recognised and loaded as a drafter (`is_model_spec`, `load_model_drafter`, the registry's last row).
"""
from __future__ import annotations

from typing import Any

import torch

from mmspec import device_tree
from mmspec.drafters.base import DraftContext, Drafter
from mmspec.errors import InputError
from mmspec.families import family_for
from mmspec.graphs import DeviceNoise
from mmspec.model import CachedModel, last_layer_device
from mmspec.tree import Proposal, TreePool, TreeSpec, grow_tree, tree_attention
from mmspec.verify import draft_probs


class ModelDrafter(Drafter):
    kind = "model"

    def __init__(self, name: str, model, processor):
        self.name = name
        self.model = model
        self.processor = processor
        self.family = family_for(model.config)
        self.cm: CachedModel | None = None
        self.fed = 0  # generated tokens already in the draft cache
        self._processor_check: tuple[int | None, bool] = (None, False)  # (id of the target's processor, same?)
        self._noise = DeviceNoise()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "sees_image": self.family.sees_image}

    def start(self, ctx: DraftContext) -> None:
        self.finish()
        self.cm = CachedModel(self.model, self.family, ctx.cache_room, ctx.cuda_graphs)
        if ctx.target_inputs is not None and self._same_processor(ctx.target):
            inputs = ctx.target_inputs  # processing the image again would give the very same tensors
        else:
            inputs = self.family.prefill_inputs(self.processor, ctx.image, ctx.prompt)
        self.cm.prefill(inputs)
        self.fed = 0
        self._noise.reset()  # seeded from the request's generator at its first sampled chain

    def _same_processor(self, target) -> bool:
        """Whether this draft model's processor turns (image, prompt) into the target's inputs:
        same family, image processing, vocabulary and chat template (checked once per target)."""
        key = id(target.processor)
        if self._processor_check[0] != key:
            mine, theirs = self.processor, target.processor
            tok = lambda p: getattr(p, "tokenizer", p)  # noqa: E731
            image_cfg = lambda p: getattr(getattr(p, "image_processor", None), "to_dict", dict)()  # noqa: E731
            same = (self.family.name == target.family.name and self.family.sees_image
                    and image_cfg(mine) == image_cfg(theirs)
                    and getattr(mine, "chat_template", None) == getattr(theirs, "chat_template", None)
                    and tok(mine).get_vocab() == tok(theirs).get_vocab())
            self._processor_check = (key, same)
        return self._processor_check[1]

    def _feed_pending(self, committed: list[int]) -> torch.Tensor:
        """Feed the tokens committed since the last step; returns the logits [1, V] after the last."""
        cm = self.cm
        pending = committed[self.fed :]
        logits = cm.forward(torch.tensor(pending, dtype=torch.long), torch.arange(cm.committed, cm.committed + len(pending)), None)
        cm.commit_rows(list(range(len(pending))))
        self.fed = len(committed)
        return logits[-1:]

    def propose(self, committed, spec, sampling, gen):
        cm = self.cm
        if spec.kind in ("chain", "dynamic") and cm.room is not None:
            return self._propose_on_device(committed, spec, sampling, gen)
        fed_nodes: list[int] = []  # pool ids in draft-cache order after the committed part

        def expand(pool: TreePool, ids: list[int]) -> torch.Tensor:
            if ids == [-1]:
                return draft_probs(self._feed_pending(committed), sampling)
            toks = torch.tensor([pool.tokens[i] for i in ids], dtype=torch.long)
            pos = torch.tensor([cm.committed - 1 + pool.depths[i] for i in ids])
            order = fed_nodes + ids
            # Ancestor-or-self among every uncommitted node: a pool-wide mask, sliced to our rows.
            anc = tree_attention(pool.parents)[1:, 1:]
            cols = torch.tensor(order)
            tail = anc[torch.tensor(ids)][:, cols]
            logits = cm.forward(toks, pos, tail)
            fed_nodes.extend(ids)
            return draft_probs(logits, sampling)

        try:
            return grow_tree(expand, spec, not sampling.greedy, gen)
        finally:
            cm.rollback()

    def _propose_on_device(self, committed, spec: TreeSpec, sampling, gen) -> Proposal:
        """The fast path's chain or dynamic tree, drafted on the device (`CachedModel.draft_chain` /
        `draft_tree`): no host round trip per token or level. The target verifies either from the
        device; the host learns a chain's tokens with the target's logits, a tree while the target runs."""
        cm = self.cm
        try:
            first = self._feed_pending(committed)[0]
            noise = self._noise.for_draft(spec, sampling, first.shape[-1], first.device, gen)
            if spec.kind == "dynamic":
                return device_tree.pending_proposal(cm.draft_tree(first, spec, sampling, noise), spec)
            return device_tree.chain_proposal(*cm.draft_chain(first, spec.depth, sampling, noise))
        finally:
            cm.rollback()

    def finish(self) -> None:
        if self.cm is not None:
            self.cm.release()


def is_model_spec(name) -> bool:
    """Whether `name` names a draft model: an existing save_pretrained directory or a hub id (a bare
    word that is neither is not). A path that cannot be a model is refused here (InputError)."""
    from mmspec.load import _where

    return not (_where(name) == name and "/" not in name)


def load_model_drafter(name, target) -> ModelDrafter:
    """A draft model directory or hub id -> a ModelDrafter; it must share the target's tokenizer."""
    from mmspec.load import load_config, load_model, load_processor, same_tokenizer

    config = load_config(name)
    processor = load_processor(name, config)
    tokenizer = getattr(processor, "tokenizer", processor)
    if not same_tokenizer(tokenizer, target.tokenizer):
        raise InputError(
            f"drafter {name} does not share the target's tokenizer ({len(tokenizer)} vs {len(target.tokenizer)} tokens "
            "or different vocabularies); a draft model must use the same tokenizer"
        )
    same = str(name) == str(target.name)
    # A split target computes its logits on its last device: the draft model runs there.
    model = target.model if same else load_model(name, last_layer_device(target.model), target.dtype, config)
    return ModelDrafter(str(name), model, processor)
