"""Plain, JSON-serialisable records of a generation: one `StepRecord` per target forward.

The engine fills these; the visualizer and lecture replays read them back with `load_trace`.
Node indices in a step are positions in `DraftTree` lists; parent -1 is the root, i.e. the last
committed token, whose target logits give the distribution for depth-1 nodes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TRACE_VERSION = 1


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1 = root (last committed token)
    depths: list[int] = field(default_factory=list)  # 1 = child of the root
    draft_probs: list[float] = field(default_factory=list)  # q(token | parent path), as proposed

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self) -> dict[int, list[int]]:
        """Children of every node in proposal order (root is -1)."""
        kids: dict[int, list[int]] = {-1: []}
        for i, p in enumerate(self.parents):
            kids.setdefault(i, [])
            kids[p].append(i)
        return kids

    def path_to(self, node: int) -> list[int]:
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


@dataclass
class StepRecord:
    index: int
    kind: str  # "prefill" (first token from the prompt forward), "draft" (speculative) or "vanilla"
    tree: DraftTree
    node_texts: list[str]  # token text of each draft node
    target_tokens: list[int]  # target's most likely token at each node's parent context
    target_texts: list[str]  # their text
    target_probs: list[float]  # target probability of each node's own token
    accepted: list[int]  # accepted node indices, root to leaf
    next_token: int  # the target's own token after the accepted path
    next_kind: str  # "bonus" (every draft on the path accepted and the path is a leaf), "correction", "target"
    next_text: str
    new_tokens: list[int]  # what this step committed, after EOS / max_new_tokens truncation
    new_texts: list[str]
    draft_ms: float
    verify_ms: float  # the target's verify forward alone
    step_ms: float  # whole step, engine overhead included (acceptance rule, cache commit, trace)
    elapsed_s: float  # since the start of generation, at the end of this step (consumer time excluded)
    extras: dict[str, Any] = field(default_factory=dict)  # drafter internals for this step

    @property
    def accepted_len(self) -> int:
        return len(self.accepted)


@dataclass
class Stats:
    new_tokens: int
    steps: int  # target forwards after the prefill
    tau: float  # tokens committed per target forward, bonus included (EAGLE convention)
    mean_accepted: float  # accepted draft tokens per forward (ViSpec convention: tau - 1)
    acceptance_by_depth: list[float]  # P(depth d accepted | depth d-1 accepted and drafted)
    drafted_by_depth: list[int]  # steps whose tree reached depth d with depth d-1 accepted
    wall_s: float  # first forward to last token, prefill included
    prefill_ms: float
    tokens_per_s: float
    draft_ms: float  # totals over all steps
    verify_ms: float
    overhead_ms: float


@dataclass
class Generation:
    mode: str  # "speculative" or "vanilla"
    config: dict[str, Any]
    prompt: str
    prompt_tokens: int
    token_ids: list[int]
    text: str
    steps: list[StepRecord]
    stats: Stats
    drafter_info: dict[str, Any] = field(default_factory=dict)  # static drafter internals (UI)
    version: int = TRACE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Generation":
        d = dict(d)
        steps = []
        for s in d.pop("steps"):
            s = dict(s)
            s["tree"] = DraftTree(**s["tree"])
            steps.append(StepRecord(**s))
        stats = Stats(**d.pop("stats"))
        return cls(steps=steps, stats=stats, **d)


def save_trace(gen: Generation, path: str | Path) -> None:
    Path(path).write_text(gen.to_json())


def load_trace(path: str | Path) -> Generation:
    try:
        data = json.loads(Path(path).read_text())
        return Generation.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        from mmspec.errors import InputError

        raise InputError(f"{path} is not an mmspec trace: {e}") from e


def compute_stats(steps: list[StepRecord], wall_s: float) -> Stats:
    """Summary numbers over the decode steps (the prefill step only counts for wall time)."""
    decode = [s for s in steps if s.kind != "prefill"]
    prefill_ms = sum(s.step_ms for s in steps if s.kind == "prefill")
    new_tokens = sum(len(s.new_tokens) for s in steps)
    max_depth = max((max(s.tree.depths, default=0) for s in decode), default=0)
    reached = [0] * max_depth
    accepted = [0] * max_depth
    for s in decode:
        tree_depth = max(s.tree.depths, default=0)
        for d in range(1, tree_depth + 1):
            if s.accepted_len >= d - 1:
                reached[d - 1] += 1
                accepted[d - 1] += s.accepted_len >= d
    n = len(decode)
    committed = sum(len(s.new_tokens) for s in decode)
    draft_ms = sum(s.draft_ms for s in steps)
    verify_ms = sum(s.verify_ms for s in steps)
    return Stats(
        new_tokens=new_tokens,
        steps=n,
        tau=committed / n if n else 0.0,
        mean_accepted=sum(s.accepted_len for s in decode) / n if n else 0.0,
        acceptance_by_depth=[a / r if r else 0.0 for a, r in zip(accepted, reached)],
        drafted_by_depth=reached,
        wall_s=wall_s,
        prefill_ms=prefill_ms,
        tokens_per_s=new_tokens / wall_s if wall_s > 0 else 0.0,
        draft_ms=draft_ms,
        verify_ms=verify_ms,
        overhead_ms=max(0.0, sum(s.step_ms for s in steps) - draft_ms - verify_ms),
    )
