"""Drafters: what proposes tokens for the target to verify.

Every drafter has `start(ctx)` (once per prompt, after the target's prefill) and
`propose(committed, spec, sampling, gen) -> Proposal`. Drafters with a next-token distribution
hand an `expand` function to `tree.grow_tree`, which owns the chain/static/dynamic shapes:
- ModelDrafter: an independent Hugging Face model with the target's tokenizer, either a small VLM
  that sees the image or a text-only causal LM that does not; it keeps its own KV cache.
- NgramDrafter: prompt lookup; continuations of earlier occurrences of the current suffix.
- RandomDrafter: uniform-ish noise; a deliberately bad drafter for tests and lessons.
Feature-level drafters (EAGLE family) plug in the same way.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmspec import device_tree
from mmspec.errors import InputError
from mmspec.families import family_for
from mmspec.graphs import DeviceNoise
from mmspec.model import CachedModel, last_layer_device
from mmspec.trace import DraftTree
from mmspec.tree import Proposal, TreePool, TreeSpec, grow_tree, tree_attention, tree_from_paths
from mmspec.verify import Sampling, draft_probs


@dataclass
class DraftContext:
    image: Image.Image | None
    prompt: str
    prompt_ids: list[int]  # the target's prefill ids, image tokens expanded
    target: Any  # mmspec.load.Target
    target_cache: Any = None  # the target's CachedModel (AASD-style drafters read its KV cache)
    target_hidden: torch.Tensor | None = None  # [len(target_layers), prompt_len, H] prefill features
    cache_room: int | None = None  # the engine's fast path: static caches with this room after the prompt
    cuda_graphs: bool = False
    target_inputs: dict[str, torch.Tensor] | None = None  # the processor's output the target prefilled with


class Drafter:
    name = "drafter"
    kind = "base"
    # Indices into the target's `hidden_states` tuple (0 = embeddings, -1 = last layer) that this
    # drafter reads; empty = none, and the target then runs without returning hidden states.
    target_layers: tuple[int, ...] = ()

    def start(self, ctx: DraftContext) -> None:
        pass

    def finish(self) -> None:
        """After the last step (also when a decode is stopped or fails): give back what start took."""

    def observe(self, target_hidden: torch.Tensor, tokens: list[int]) -> None:
        """After each verify: target features [len(target_layers), k, H] at the k positions just
        committed to the target cache (the step's root, then the accepted nodes), and their tokens."""

    def propose(self, committed: list[int], spec: TreeSpec, sampling: Sampling, gen: torch.Generator) -> Proposal:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}


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
        `draft_tree`): no host round trip per token or level. A chain's tokens reach the host with
        the target's logits; a tree's in one copy before the target's forward."""
        cm = self.cm
        try:
            first = self._feed_pending(committed)[0]
            shape = (spec.depth,) if spec.kind == "chain" else (spec.depth, spec.topk)
            noise = None
            if not sampling.greedy:
                noise = self._noise.uniforms(math.prod(shape), first.shape[-1], first.device, gen).view(*shape, -1)
            if spec.kind == "dynamic":
                return device_tree.to_proposal(cm.draft_tree(first, spec, sampling, noise), spec)
            tokens, probs, q_rows = cm.draft_chain(first, spec.depth, sampling, noise)
        finally:
            cm.rollback()
        depth = spec.depth
        tree = DraftTree(tokens=[0] * depth, parents=list(range(-1, depth - 1)), depths=list(range(1, depth + 1)),
                         draft_probs=[0.0] * depth)
        return Proposal(tree, {d - 1: q_rows[d] for d in range(depth)}, device_tokens=tokens, device_probs=probs)

    def finish(self) -> None:
        if self.cm is not None:
            self.cm.release()


class RandomDrafter(Drafter):
    """Proposes tokens from random distributions: almost always rejected, still lossless."""

    kind = "random"

    def __init__(self, vocab_size: int, seed: int = 0):
        self.name = "random"
        self.vocab_size = vocab_size
        self.rng = torch.Generator().manual_seed(seed)

    def propose(self, committed, spec, sampling, gen):
        def expand(pool, ids):
            logits = torch.randn(len(ids), self.vocab_size, generator=self.rng) * 3.0
            return draft_probs(logits, sampling)

        return grow_tree(expand, spec, not sampling.greedy, gen)


class NgramDrafter(Drafter):
    """Prompt lookup: find the current suffix earlier in prompt + output, propose what followed."""

    kind = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.name = "ngram"
        self.max_n, self.min_n = max_n, min_n
        self.prompt_ids: list[int] = []

    def info(self):
        return {"name": self.name, "kind": self.kind, "max_n": self.max_n, "min_n": self.min_n}

    def start(self, ctx: DraftContext) -> None:
        media = ctx.target.family.media_token_ids(ctx.target.model.config)
        self.prompt_ids = [t for t in ctx.prompt_ids if t not in media]

    def propose(self, committed, spec, sampling, gen):
        seq = self.prompt_ids + committed
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            suffix = seq[-n:]
            found: Counter[tuple[int, ...]] = Counter()
            for i in range(len(seq) - n - 1, -1, -1):
                if seq[i : i + n] == suffix:
                    cont = tuple(seq[i + n : i + n + spec.depth])
                    if cont:
                        found[cont] += 1
            if found:
                conts = [(list(c), float(w)) for c, w in found.most_common()]
                return Proposal(tree_from_paths(conts, spec), {})
        return Proposal(tree_from_paths([], spec), {})


DRAFTER_KINDS = ("vanilla", "ngram", "random")


def load_drafter(name: str | None, target, device: str | None = None, dtype: str | None = None) -> Drafter | None:
    """`vanilla`/None -> no drafter; `ngram`; `random`; else an EAGLE-3 head, feature-drafter or model
    directory, or a hub id."""
    from mmspec.load import _where, load_config, load_model, load_processor, same_tokenizer

    if name in (None, "", "vanilla", "none"):
        return None
    if name == "ngram":
        return NgramDrafter()
    if name == "random":
        return RandomDrafter(len(target.tokenizer))
    from mmspec.drafters.eagle3_head import is_eagle3_head, load_eagle3_head
    from mmspec.drafters.feature.drafter import is_feature_drafter, load_feature_drafter

    if is_eagle3_head(name):  # config.json naming LlamaForCausalLMEagle3 (vLLM / SGLang / SpecForge format)
        return load_eagle3_head(name, target)
    if is_feature_drafter(name):  # a directory with mmspec_drafter.json: an EAGLE-family drafter
        return load_feature_drafter(name, target)
    where = _where(name)
    if where == name and "/" not in name:
        raise InputError(f"unknown drafter {name!r}: use one of {', '.join(DRAFTER_KINDS)}, a model directory or a hub id")
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
