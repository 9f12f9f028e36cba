"""The feature drafter's view of the prompt: one `Entry` per drafter position (or per merged group
of visual tokens), the visual-token compression (pool / top-k / queries) and the per-token status
map the UI shows (`plan_entries`), the visual-token grid (`image_grid`) and the image span in the
prompt ids (`image_span`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from mmspec.drafters.feature.net import FeatConfig
from mmspec.errors import InputError

TEXT, VIS, QUERY = 0, 1, 2  # Entry kinds


@dataclass
class Entry:
    members: list[int]  # drafter positions averaged into this entry
    rope: int
    kind: int = TEXT  # TEXT, VIS or QUERY
    slot: int = -1  # adaptor output index for QUERY entries
    post: bool = False  # a text entry after the image (ViSpec global fusion)

    @property
    def src(self) -> int:
        return max(self.members)


def image_grid(n: int, size: tuple[int, int] | None = None, processor=None, image=None) -> tuple[int, int]:
    """(rows, cols) of the visual tokens: the processor's own grid where it has one (Qwen2-VL),
    else the factorisation of n closest to the image's aspect ratio (LLaVA: 196 -> 14 x 14)."""
    ip = getattr(processor, "image_processor", None)
    if ip is not None and image is not None and hasattr(ip, "merge_size"):
        try:
            thw = ip(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
            m = int(ip.merge_size)
            r, c = int(thw[1]) // m, int(thw[2]) // m
            if r * c == n:
                return r, c
        except Exception:  # noqa: BLE001 - fall back to the aspect ratio
            pass
    aspect = (size[1] / size[0]) if size else 1.0  # rows / cols = height / width
    best = (1, n)
    for r in range(1, n + 1):
        if n % r == 0 and abs(math.log(r / (n // r)) - math.log(aspect)) < abs(math.log(best[0] / best[1]) - math.log(aspect)):
            best = (r, n // r)
    return best


def plan_entries(n_pos: int, span: tuple[int, int] | None, grid: tuple[int, int] | None, cfg: FeatConfig,
                 saliency: list[float] | None = None, own_from: int = 0) -> tuple[list[Entry], dict | None]:
    """Entries for drafter positions own_from..n_pos-1, and the visual map (None without compression).

    span = (v0, n): the image tokens' sequence indices v0..v0+n-1; visual entry i is position v0+i-1.
    """
    if span is None:
        return [Entry([p], p) for p in range(own_from, n_pos)], None
    v0, n = span
    vis_lo, vis_hi = v0 - 1, v0 + n - 2  # drafter positions of the visual entries
    pre = [Entry([p], p) for p in range(own_from, min(vis_lo, n_pos))]
    post = [Entry([p], p, post=True) for p in range(max(vis_hi + 1, own_from), n_pos)]
    vpos = [v0 - 1 + i for i in range(n)]
    ok = [p >= own_from and 0 <= p < n_pos for p in vpos]
    status = ["kept"] * n
    groups = list(range(n))
    vis: list[Entry] = []
    mode = cfg.compress
    if mode == "pool":
        rows, cols = grid
        k = cfg.pool
        gcols = -(-cols // k)
        by_group: dict[int, list[int]] = {}
        for i in range(n):
            g = (i // cols) // k * gcols + (i % cols) // k
            groups[i] = g
            by_group.setdefault(g, []).append(i)
        for g in sorted(by_group):
            idx = [i for i in by_group[g] if ok[i]]
            if idx:
                vis.append(Entry([vpos[i] for i in idx], max(vpos[i] for i in idx), VIS))
            for i in by_group[g]:
                status[i] = "merged" if len(by_group[g]) > 1 else "kept"
    elif mode == "topk":
        keep = max(1, round(cfg.topk_keep * n))
        sal = saliency if saliency is not None else [0.0] * n
        top = sorted(sorted(range(n), key=lambda i: (-sal[i], i))[:keep])
        topset = set(top)
        status = ["kept" if i in topset else "dropped" for i in range(n)]
        vis = [Entry([vpos[i]], vpos[i], VIS) for i in top if ok[i]]
    elif mode == "queries":
        nq = min(cfg.queries, n)
        status = ["merged"] * n
        groups = [0] * n
        last = [p for p, o in zip(vpos, ok) if o][-nq:] if any(ok) else []
        vis = [Entry([p], p, QUERY, slot=j) for j, p in enumerate(last)]
    else:
        vis = [Entry([vpos[i]], vpos[i], VIS) for i in range(n) if ok[i]]
    vmap = None
    if mode != "none":
        vmap = {"grid": list(grid), "status": status, "groups": groups, "mode": mode}
        if saliency is not None:
            vmap["saliency"] = [round(float(s), 5) for s in saliency]
    return pre + vis + post, vmap


def image_span(ids: list[int], image_id) -> tuple[int, int] | None:
    """(first index, length) of the image placeholders in `ids`; image_id: one id or a set of them
    (a family's media_token_ids)."""
    if image_id is None:
        return None
    media = {image_id} if isinstance(image_id, int) else set(image_id)
    idx = [i for i, t in enumerate(ids) if t in media]
    if not idx:
        return None
    if idx[-1] - idx[0] + 1 != len(idx):
        raise InputError("feature drafters support one contiguous image span per prompt")
    return idx[0], len(idx)
