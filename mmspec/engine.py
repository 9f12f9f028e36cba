"""The decode loop: prefill, then draft -> verify -> keep the accepted path, one record per step.

`Decoder` is iterable (yields `StepRecord`s as they happen) and holds the finished `Generation` in
`.result`. With no drafter it is vanilla decoding through the very same loop: an empty tree, one
token per target forward. Invariant after every step: the target cache holds the prompt and every
committed token except the last, which is fed as the root of the next step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from PIL import Image

from mmspec.drafters.base import DraftContext, Drafter
from mmspec.errors import InputError
from mmspec.kvcache import to_device
from mmspec.load import Target, load_image
from mmspec.model import CachedModel
from mmspec.trace import DraftTree, Generation, StepRecord, compute_stats
from mmspec.tree import NO_TREE, Proposal, TreeSpec, parse_tree_spec, tree_attention
from mmspec.verify import Sampling, score, token_probs, verify

MAX_NEW_TOKENS_LIMIT = 4096
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-3, 100.0
TOP_P_MIN = 1e-6
SEED_LIMIT = 2**63


@dataclass
class DecodeConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    tree: str | TreeSpec = "chain:4"
    extra: dict[str, Any] = field(default_factory=dict)
    # Fast path: preallocated KV cache (None: on for a target on one CUDA device) and, on CUDA,
    # forwards replayed from CUDA graphs. Off, every forward is an ordinary eager call.
    static_cache: bool | None = None
    cuda_graphs: bool = True

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p)

    @property
    def tree_spec(self) -> TreeSpec:
        return self.tree if isinstance(self.tree, TreeSpec) else parse_tree_spec(self.tree)

    def check(self) -> None:
        """Refuse settings the decode loop cannot honour, with a message naming the accepted range.

        Values may come from a CLI, an app or a shared trace: NaN, infinities, bools and
        out-of-range ints must stop here, not as a NaN probability or a seed overflow mid-decode."""
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InputError(f"max_new_tokens must be an integer between 1 and {MAX_NEW_TOKENS_LIMIT}")
        t = self.temperature
        # Below TEMPERATURE_MIN, logits / T overflows to inf and the softmax is NaN; 0 means greedy.
        if not _is_real(t) or not (t == 0 or TEMPERATURE_MIN <= t <= TEMPERATURE_MAX):
            raise InputError(f"temperature must be 0 (greedy) or between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g}")
        if not _is_real(self.top_p) or not TOP_P_MIN <= self.top_p <= 1:
            raise InputError(f"top_p must be between {TOP_P_MIN:g} and 1")
        # torch.Generator.manual_seed takes a signed or unsigned 64-bit value; one range keeps it simple.
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise InputError("seed must be an integer with 0 <= seed < 2**63")
        if not isinstance(self.tree, (str, TreeSpec)):
            raise InputError(f"tree must be a tree spec string, got {type(self.tree).__name__}")
        self.tree_spec  # noqa: B018 - parse early for a clear error


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    """A finite int or float (bools and strings are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class _Timer:
    """Named marks of device work: CUDA events on GPU (read after the step's sync), perf_counter
    on CPU. `ms(a, b)` is the time from mark a to mark b."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = self.marks[name] = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, a: str, b: str) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b])
        return (self.marks[b] - self.marks[a]) * 1000.0


def _features(hidden, layers: tuple[int, ...], rows: list[int] | None = None) -> torch.Tensor:
    """[len(layers), k, H] target features at `rows` (all when None). Layers of a split target may
    sit on several devices; features meet where logits are made."""
    dev = hidden[-1].device
    if rows is None:
        return torch.stack([hidden[i][0].to(dev) for i in layers])
    idx = to_device(torch.tensor(rows), dev)
    return torch.stack([hidden[i][0].to(dev).index_select(0, idx) for i in layers])


class Decoder:
    def __init__(self, target: Target, drafter: Drafter | None, image: Image.Image | str | None, prompt: str,
                 config: DecodeConfig | None = None):
        self.target = target
        self.drafter = drafter
        self.config = config or DecodeConfig()
        self.config.check()
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty")
        self.prompt = prompt
        self.image = load_image(image) if image is not None else None
        self.result: Generation | None = None
        self.stopped = False
        self.target_cache: CachedModel | None = None  # exposed for tests and tools
        self._pieces: dict[int, str] = {}  # token id -> its text

    def stop(self) -> None:
        """Ask a running decode to finish after the current step (the result is kept)."""
        self.stopped = True

    def _text(self, ids: list[int]) -> list[str]:
        # Every step shows its tokens as text; one tokenizer call per distinct id, not per mention.
        pieces = self._pieces
        for t in ids:
            if t not in pieces:
                pieces[t] = self.target.tokenizer.decode([t])
        return [pieces[t] for t in ids]

    def __iter__(self) -> Iterator[StepRecord]:
        tgt, cfg = self.target, self.config
        spec = cfg.tree_spec if self.drafter is not None else NO_TREE
        inputs = tgt.family.prefill_inputs(tgt.processor, self.image, self.prompt)
        prompt_ids = inputs["input_ids"][0].tolist()
        max_pos = getattr(getattr(tgt.model.config, "text_config", tgt.model.config), "max_position_embeddings", None)
        max_new = cfg.max_new_tokens
        if max_pos is not None:
            room = max_pos - len(prompt_ids)
            if room < 1:
                raise InputError(f"the prompt takes {len(prompt_ids)} tokens; the target's context is {max_pos}")
            max_new = min(max_new, room)
        static = cfg.static_cache if cfg.static_cache is not None else tgt.device.type == "cuda"
        # Room after the prompt: every committed token plus the widest forward padded to a power of
        # two, twice over for a drafter that feeds pending tokens and tree nodes before rolling back.
        cache_room = max_new + 2 * (1 << spec.max_nodes.bit_length()) + spec.max_nodes + 8 if static else None
        graphs = bool(static and cfg.cuda_graphs)
        tm = self.target_cache = CachedModel(tgt.model, tgt.family, cache_room, graphs)
        try:
            yield from self._decode(tm, inputs, prompt_ids, max_new, spec, cache_room, graphs)
        finally:
            tm.release()
            if self.drafter is not None:
                self.drafter.finish()

    def _decode(self, tm: CachedModel, inputs, prompt_ids: list[int], max_new: int, spec: TreeSpec,
                cache_room: int | None, graphs: bool) -> Iterator[StepRecord]:
        tgt, cfg = self.target, self.config
        sampling = cfg.sampling
        gen = torch.Generator().manual_seed(cfg.seed)
        eos = tgt.eos_ids

        steps: list[StepRecord] = []
        committed: list[int] = []
        # Wall time is the engine's own: time spent by whoever consumes the steps is added to
        # t_start, so a slow consumer (a UI) does not inflate elapsed_s or tokens/s.
        t_start = time.perf_counter()
        layers = tuple(getattr(self.drafter, "target_layers", ()) or ())
        timer = _Timer(tgt.device)
        timer.mark("start")
        logits, hidden = tm.prefill(inputs, hidden=True) if layers else (tm.prefill(inputs), None)
        first = self._sample_one(logits, sampling, gen)
        timer.mark("prefilled")
        committed.append(first)
        record = self._record(0, "prefill", Proposal(DraftTree(), {}), None, first, [first], 0.0,
                              timer.ms("start", "prefilled"), (time.perf_counter() - t_start) * 1000, t_start)
        steps.append(record)
        t_yield = time.perf_counter()
        yield record
        t_start += time.perf_counter() - t_yield
        done = first in eos or len(committed) >= max_new
        if self.drafter is not None and not done:
            feats = _features(hidden, layers) if layers else None
            self.drafter.start(DraftContext(self.image, self.prompt, prompt_ids, tgt, tm, feats, cache_room, graphs,
                                            inputs))
        while not done and not self.stopped:
            t_step = time.perf_counter()
            step_spec = spec.limited(max_new - len(committed) - 1)
            # propose -> verify -> commit
            timer.mark("start")
            proposal = (self.drafter.propose(committed, step_spec, sampling, gen)
                        if self.drafter is not None and step_spec.kind != "none" else Proposal(DraftTree(), {}))
            timer.mark("drafted")
            verdict, hidden = self._verify_step(tm, committed[-1], proposal, sampling, gen, bool(layers), timer)
            observe_ms = 0.0
            if layers:  # feeding the accepted features to the drafter is drafting work
                rows = [0] + [n + 1 for n in verdict.accepted]
                timer.mark("observe")
                self.drafter.observe(_features(hidden, layers, rows),
                                     [committed[-1]] + [proposal.tree.tokens[n] for n in verdict.accepted])
                timer.mark("observed")
                observe_ms = timer.ms("observe", "observed")
            new, done = self._commit(committed, proposal.tree, verdict, max_new, eos)
            # verify_ms is the target's forward and its reductions; the acceptance rule, cache
            # commit and trace building land in the step's overhead (step_ms - draft_ms - verify_ms).
            record = self._record(len(steps), "draft" if self.drafter is not None else "vanilla", proposal, verdict,
                                  verdict.next_token, new, timer.ms("start", "drafted") + observe_ms,
                                  timer.ms("verify", "verified"), (time.perf_counter() - t_step) * 1000, t_start)
            steps.append(record)
            t_yield = time.perf_counter()
            yield record
            t_start += time.perf_counter() - t_yield
        wall = time.perf_counter() - t_start
        self.result = Generation(
            mode="speculative" if self.drafter is not None else "vanilla",
            config={
                "target": tgt.name, "drafter": self.drafter.name if self.drafter else "vanilla",
                "tree": spec.describe(), "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "seed": cfg.seed, "device": str(tgt.device), "dtype": str(tgt.dtype).replace("torch.", ""),
                "static_cache": cache_room is not None, "cuda_graphs": graphs,
                **cfg.extra,
            },
            prompt=self.prompt,
            prompt_tokens=len(prompt_ids),
            token_ids=committed,
            text=tgt.tokenizer.decode(committed, skip_special_tokens=True),
            steps=steps,
            stats=compute_stats(steps, wall),
            drafter_info=self.drafter.info() if self.drafter is not None else {},
        )

    @staticmethod
    def _verify_step(tm: CachedModel, root: int, proposal: Proposal, sampling: Sampling, gen: torch.Generator,
                     hidden: bool, timer: _Timer):
        """The target's one forward over [root] + the draft tree, the acceptance rule, and the
        target cache keeping the root and the accepted path. Returns the verdict and, when asked,
        the forward's hidden states (their rows: root, then tree nodes)."""
        toks, pos, mask = Decoder._verify_inputs(proposal, root, tm.committed)
        timer.mark("verify")  # mask and positions are engine overhead, not verification
        out = tm.forward(toks, pos, mask, hidden=hidden)
        logits, states = out if hidden else (out, None)
        if proposal.device_tree is not None:  # its host copy was queued first: read while the target runs
            proposal.resolve()
            used = 1 + len(proposal.tree)  # rows past the tree are the device tree's unused slots
            logits, toks = logits[:used], toks[:used]
        # Verification's reductions go to the device queue behind the forward; the host then
        # waits once, for a few numbers per node rather than the logits.
        scores = score(logits, toks, proposal.tree.parents, sampling, proposal.proposals)
        timer.mark("verified")
        proposal.resolve()
        verdict = verify(proposal.tree, logits, sampling, proposal.proposals, gen, scores)
        tm.commit_rows([0] + [n + 1 for n in verdict.accepted])
        return verdict, states

    @staticmethod
    def _verify_inputs(proposal: Proposal, root: int, root_pos: int):
        """Tokens, positions and tree mask (None: a chain) of the root and the draft. A draft made on
        the device is read from there, so the forward is queued without waiting for the host."""
        tree = proposal.tree
        if proposal.device_tree is not None:
            return proposal.device_tree.verify_inputs(root, root_pos)
        if proposal.device_tokens is not None:
            toks = torch.cat([torch.full((1,), root, device=proposal.device_tokens.device), proposal.device_tokens])
        else:
            toks = torch.tensor([root] + tree.tokens, dtype=torch.long)
        pos = torch.tensor([root_pos] + [root_pos + d for d in tree.depths], dtype=torch.long)
        chain = all(p == i - 1 for i, p in enumerate(tree.parents))
        return toks, pos, None if chain else tree_attention(tree.parents)

    @staticmethod
    def _commit(committed: list[int], tree: DraftTree, verdict, max_new: int, eos: set[int]) -> tuple[list[int], bool]:
        """Append the accepted tokens and the correction/bonus, cut at EOS and max_new_tokens."""
        new = ([tree.tokens[n] for n in verdict.accepted] + [verdict.next_token])[: max_new - len(committed)]
        done = False
        for i, t in enumerate(new):
            if t in eos:
                new, done = new[: i + 1], True
                break
        committed.extend(new)
        return new, done or len(committed) >= max_new

    def _sample_one(self, logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(token_probs(logits.float().cpu(), sampling), 1, generator=gen))

    def _record(self, index, kind, proposal, verdict, next_token, new, draft_ms, verify_ms, step_ms, t_start) -> StepRecord:
        tree = proposal.tree
        accepted = verdict.accepted if verdict else []
        if len(tree) == 0:
            next_kind = "target"
        else:
            # Bonus: the accepted path ends at a leaf, so no draft was rejected on the way.
            last = accepted[-1] if accepted else -1
            next_kind = "bonus" if last != -1 and last not in tree.parents else "correction"
        return StepRecord(
            index=index, kind=kind, tree=tree, node_texts=self._text(tree.tokens),
            target_tokens=verdict.target_tokens if verdict else [],
            target_texts=self._text(verdict.target_tokens) if verdict else [],
            target_probs=verdict.target_probs if verdict else [],
            accepted=accepted, next_token=next_token, next_kind=next_kind, next_text=self._text([next_token])[0],
            new_tokens=new, new_texts=self._text(new), draft_ms=draft_ms, verify_ms=verify_ms, step_ms=step_ms,
            elapsed_s=time.perf_counter() - t_start, extras=proposal.extras,
        )


def generate(target: Target, drafter: Drafter | None, image, prompt: str, config: DecodeConfig | None = None) -> Generation:
    dec = Decoder(target, drafter, image, prompt, config)
    for _ in dec:
        pass
    return dec.result
