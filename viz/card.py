"""A drafter's card, acceptance summaries for any drafter, and the embedded target's world.

- `card_html(info)`: the dict `Drafter.info()` returns, as prose plus small tables: what the drafter
  is, which target layers it reads and the layer-choice rule in words, its size, its training
  quality. Never raw JSON, never an absolute path (only a path's last component).
- `acceptance_summary(gen)` / `acceptance_html(gen)`: acceptance by draft depth, by position in the
  answer, and for tokens that name a visual attribute vs the rest (the split of
  bench/embedded_tau.py: a token is visual when its stripped, lower-cased text is in
  `mmspec.world.VISUAL_WORDS`; sub-word pieces count as other, so the split is approximate).
- `world_scope(prompt, image_stats)`: whether a question (and picture) is inside the synthetic world
  the embedded target was trained on, with a one-line reason.

Every string from a trace or a drafter is escaped exactly once, with `html.escape`, where it is put
into HTML here; the functions returning plain data leave text unescaped.
"""
from __future__ import annotations

import html
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

from mmspec.entropy import choose_layers
from mmspec.trace import Generation
from mmspec.world import TEXT_ONLY_BANK, VISUAL_WORDS
from viz.bench import drafter_label
from viz.tokens import ends_with_eos

KIND_PROSE = {
    "model": "a small language model run as a draft: it reads the same prompt and guesses the next tokens",
    "ngram": "an n-gram lookup: it copies what followed the last few tokens earlier in the prompt or the answer; "
             "no network at all",
    "random": "random tokens: a control that shows the cost of drafting when nothing is ever accepted (τ = 1.00)",
    "feature": "a feature drafter (EAGLE family): one small decoder layer that reads the target's own hidden "
               "states and predicts its next features, decoded by the target's own output layer",
    "eagle3": "an EAGLE-3 head (vLLM / SGLang / SpecForge format): a small layer fed with three of the target's "
              "hidden layers, fused, predicting its next tokens",
}
VARIANT_PROSE = {
    "eagle": "EAGLE: the target's last-layer feature with the next token's embedding",
    "dream": "DREAM: cross-attention to intermediate target layers chosen by attention entropy",
    "dream_topk": "DREAM with only the most attended visual tokens kept",
    "pool2": "visual tokens averaged over 2×2 patches", "pool4": "visual tokens averaged over 4×4 patches",
    "topk": "only the visual tokens the target attends to most are kept",
    "vispec": "ViSpec: a learned query compresses the image, and a global image vector joins every text position",
    "msd": "MSD: visual tokens take their own path from the raw image embeddings",
    "aasd": "AASD: no prompt entries; attends to the target's own cache of the prompt and image",
    "flash": "FLASH: several features per forward (semi-autoregressive), image compressed by learned queries",
}
# The rule's numbers come from mmspec.entropy.choose_layers' own defaults, so the words follow the code.
_RULE = inspect.signature(choose_layers).parameters
RULE_K, RULE_FRAC = _RULE["k"].default, _RULE["frac"].default
LAYER_RULE = ("Layer choice rule (mmspec.entropy): the normalised attention entropy of each decoder layer is "
              f"averaged over heads and over the prompt's text after the image; the {RULE_K} lowest-entropy layers "
              f"among the first {RULE_FRAC:.0%} of the layers are chosen, plus the last layer. Later layers are "
              "never candidates, however low their entropy.")
SHOWN_KEYS = {"name", "kind", "variant", "options", "entropy_profile", "chosen_layers", "dream_uses_chosen_layers",
              "supervised_layer", "target_layers", "aux_layers_from", "trained", "quality", "params", "size_mb_fp16",
              "sees_image", "max_n", "min_n", "engines_would_read"}


# ---------------------------------------------------------------- plain values, never JSON or paths

# A path: rooted (/, ~/, ./, ../, C:\ — spaces allowed), or two or more separators and no spaces.
PATH_RE = re.compile(r"^(?:/|~/|\.{1,2}/|[A-Za-z]:[\\/])|^\S*[\\/]\S*[\\/]\S*$")


def last_part(value: str) -> str:
    """A file path shows only its last component (never a server's directories); a hub id like
    'org/model' and prose that mentions a slash are left as they are."""
    if PATH_RE.match(value):
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1] or value
    return value


def plain(value: Any) -> str:
    """A value as words: lists joined by commas, booleans yes/no, floats rounded, nested dicts as
    'key value; key value', strings reduced to a path's last part. Unescaped."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{k} {plain(v)}" for k, v in value.items()) or "none"
    if value is None:
        return "–"
    return last_part(str(value))


def table(rows: list[tuple[str, Any]], cls: str = "mmspec-card-table") -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(plain(v))}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>' if body else ""


# ---------------------------------------------------------------- the card

def what_it_is(info: dict) -> str:
    kind = str(info.get("kind", "?"))
    text = KIND_PROSE.get(kind, f"a drafter of kind {kind}")
    if kind == "model" and "sees_image" in info:
        text += "; it sees the image too" if info["sees_image"] else "; it is text-only and never sees the image"
    variant = info.get("variant")
    if variant:
        text += f". Variant {variant} ({VARIANT_PROSE.get(str(variant), 'a custom configuration')})"
    return text[0].upper() + text[1:] + "."


def layer_sentences(info: dict) -> list[str]:
    """Which target layers the drafter reads, and for entropy-chosen layers the rule and its consequence."""
    out = []
    if info.get("target_layers"):
        src = f" ({plain(info['aux_layers_from'])})" if info.get("aux_layers_from") else ""
        layers = info["target_layers"]
        word = "layer" if len(layers) == 1 else "layers"
        out.append(f"Reads the target's hidden states of {word} {plain(layers)}{src}.")
    chosen, profile = info.get("chosen_layers") or [], info.get("entropy_profile") or []
    if chosen:
        uses = "reads" if info.get("dream_uses_chosen_layers", True) else "would read (unused by this variant)"
        out.append(f"Entropy-chosen layers it {uses}: {plain(chosen)}"
                   + (f"; layer {info['supervised_layer']} is also a training target." if
                      info.get("supervised_layer") is not None else "."))
        out.append(LAYER_RULE)
        out += skipped_layers(profile, chosen)
    return out


def skipped_layers(profile: list[float], chosen: list[int], frac: float = RULE_FRAC) -> list[str]:
    """Why lower-entropy layers than the chosen ones were passed over (they lie past the early range)."""
    if not profile or not chosen:
        return []
    early = max(1, math.ceil(frac * len(profile)))
    worst = max(profile[c] for c in chosen if c < early) if any(c < early for c in chosen) else -math.inf
    later = [i for i in range(early, len(profile) - 1) if profile[i] < worst]
    if not later:
        return []
    return [f"Layers {plain(later)} have lower entropy but lie past the first {early} of {len(profile)} layers, "
            "so the rule does not consider them."]


def quality_rows(info: dict) -> list[tuple[str, Any]]:
    q = info.get("quality") or {}
    held, before = q.get("heldout") or {}, q.get("before_training") or {}
    rows = []
    for key, label in (("acc0", "next-token agreement with the target"), ("chain_accept", "accepted per chain step"),
                       ("kl0", "KL to the target (lower is better)")):
        if key in held:
            was = f" (untrained: {plain(before[key])})" if key in before else ""
            rows.append((label, f"{plain(held[key])}{was}"))
    if "trained" in info:
        rows.append(("trained", info["trained"]))
    return rows


def size_rows(info: dict) -> list[tuple[str, Any]]:
    rows = []
    if info.get("params") is not None:
        rows.append(("parameters", f"{int(info['params']):,}"))
    if info.get("size_mb_fp16") is not None:
        rows.append(("size at fp16", f"{info['size_mb_fp16']} MB"))
    return rows


def card_html(info: dict | None) -> str:
    """The drafter's card: prose, then tables (size, training quality, other settings)."""
    if not info:
        return '<div class="mmspec-card"><p>Vanilla decoding: no drafter, one token per target forward.</p></div>'
    name = plain(info.get("name", "drafter"))
    words = drafter_label(name)
    head = name if words == name else f"{words} ({name})"
    parts = [f"<h4>{html.escape(head)}</h4>", f"<p>{html.escape(what_it_is(info))}</p>"]
    parts += [f"<p>{html.escape(s)}</p>" for s in layer_sentences(info)]
    for title, rows in (("Size", size_rows(info)), ("Training quality (held-out prompts)", quality_rows(info)),
                        ("Settings", settings_rows(info))):
        if rows:
            parts.append(f"<h5>{html.escape(title)}</h5>{table(rows)}")
    return f'<div class="mmspec-card">{"".join(parts)}</div>'


def settings_rows(info: dict) -> list[tuple[str, Any]]:
    """Options and any keys the prose does not cover, one row each (values as words)."""
    rows = [(k, v) for k, v in (info.get("options") or {}).items() if k != "variant"]
    rows += [(k.replace("_", " "), v) for k, v in info.items() if k not in SHOWN_KEYS]
    if info.get("engines_would_read"):
        rows += [(f"{eng} would read layers", ids) for eng, ids in info["engines_would_read"].items()]
    if "max_n" in info:
        rows.append(("matched n-gram length", f"{info.get('min_n', '?')} to {info['max_n']} tokens"))
    return rows


# ---------------------------------------------------------------- acceptance for any drafter

def is_visual(text: str) -> bool:
    return text.strip().lower().strip(".,;:'!?") in VISUAL_WORDS


def _rate(a: int, n: int) -> float | None:
    return a / n if n else None


def acceptance_summary(gen: Generation, window: int = 16) -> dict[str, Any]:
    """Plain data: by depth (Stats), by answer position (share of accepted drafts per `window` tokens)
    and visual vs other tokens, each as (accepted, total, rate). The prefill token counts for positions
    only; an end-of-text token is not content and counts nowhere."""
    by_pos: list[list[int]] = []
    split = {"visual": [0, 0], "other": [0, 0]}
    pos = 0
    content = sum(len(s.new_tokens) for s in gen.steps) - ends_with_eos(gen, None)
    for s in gen.steps:
        for i, text in enumerate(s.new_texts[: len(s.new_tokens)]):
            if pos >= content:
                break
            acc = s.kind == "draft" and i < len(s.accepted)
            if s.kind != "prefill":
                cell = split["visual" if is_visual(text) else "other"]
                cell[0] += acc
                cell[1] += 1
            if pos // window >= len(by_pos):
                by_pos.append([0, 0])
            by_pos[pos // window][0] += acc
            by_pos[pos // window][1] += 1
            pos += 1
    return {
        "by_depth": [(r, n) for r, n in zip(gen.stats.acceptance_by_depth, gen.stats.drafted_by_depth)],
        "by_position": [(k * window, a, n, _rate(a, n)) for k, (a, n) in enumerate(by_pos)],
        "visual": (*split["visual"], _rate(*split["visual"])),
        "other": (*split["other"], _rate(*split["other"])),
        "window": window,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def acceptance_html(gen: Generation | None, window: int = 16) -> str:
    """The summary as two small tables (any drafter; vanilla has nothing to accept)."""
    if gen is None or gen.mode != "speculative":
        return '<div class="mmspec-card"><p>Acceptance needs a speculative run.</p></div>'
    s = acceptance_summary(gen, window)
    kinds = [("visual attribute words", s["visual"]), ("other tokens", s["other"])]
    split = table([(k, f"{_pct(r)} accepted drafts ({a} of {n})" if n else "none in this answer")
                   for k, (a, n, r) in kinds])
    w = s["window"]
    pos = table([(f"tokens {start + 1}–{start + n}", f"{_pct(r)} ({a} of {n})")
                 for start, a, n, r in s["by_position"]])
    note = ("Visual attribute words are colours, shapes, sizes, positions, numbers and the rendered words; a word "
            "split into pieces counts as other.")
    return (f'<div class="mmspec-card"><h5>Visual vs other tokens</h5>{split}<p>{html.escape(note)}</p>'
            f"<h5>Accepted drafts along the answer (per {w} tokens)</h5>{pos}</div>")


# ---------------------------------------------------------------- the embedded target's world

@dataclass(frozen=True)
class Scope:
    inside: bool
    reason: str  # one line, plain text


# The non-visual words of the world's question templates (sampled from mmspec.world.make_qa; a test
# re-samples them), plus a few plain synonyms a visitor uses for the same things.
QUESTION_WORDS = frozenset("""
a about above an any anything appear are be below big bigger can cell cells color colors colour colours contain
count describe description detail detailed do does every everything exist find give good grid have hello how i
image in is kind larger largest left list located lot many me morning name number object objects of on or
picture placed please positions possible read say scene see shape shapes side size sizes smaller tell text than
thank thanks the there things this to what where which who word world written you
it its that these those each all some with inside next beside between same most biggest smallest tiny little
position where's what's how's letters letter digit digits words row rows column columns thing item items
figure figures""".split())
WORLD_TERMS = VISUAL_WORDS | {"shape", "shapes", "colour", "color", "colours", "colors", "object", "objects", "image",
                              "picture", "scene", "grid", "written", "text", "count", "many", "describe",
                              "description", "size", "sizes", "position", "positions", "cell", "cells"}
CANNED = {p.lower().strip() for prompts, _ in TEXT_ONLY_BANK for p in prompts}
SCOPE_NOTE = ("The embedded target (13.9M parameters) knows only a synthetic world: up to eight coloured shapes "
              "on a 3×3 grid, their sizes, positions, counts and a few rendered words or digits.")


def foreign_words(prompt: str) -> list[str]:
    """Words of `prompt` that no question of the world uses (in order, without repeats)."""
    out = []
    for w in re.findall(r"[a-z0-9']+", prompt.lower()):
        if w not in VISUAL_WORDS and w not in QUESTION_WORDS and w not in out:
            out.append(w)
    return out


def world_scope(prompt: str, image_stats: dict | None = None) -> Scope:
    """Whether `prompt` (and a picture with `image_stats`, see `image_stats_of`) is inside the
    embedded target's world. Rule: a chat line the target was trained on is in; otherwise every word
    must be one the world's questions use and at least one must name something of the world (a shape,
    colour, size, position, count, the image); a picture must look like a rendered scene."""
    words = re.findall(r"[a-z0-9']+", prompt.lower())
    if not words:
        return Scope(False, "Empty question: ask about the shapes, colours, sizes or positions in the picture.")
    if prompt.lower().strip() in CANNED:
        return Scope(True, "A chat line the embedded target was trained on.")
    foreign = foreign_words(prompt)
    if foreign or not any(w in WORLD_TERMS for w in words):
        unknown = (f" (it does not know: {', '.join(foreign[:4])})" if foreign
                   else " (it names no shape, colour, size, position, count or image)")
        return Scope(False, "Outside the embedded target's world of coloured shapes on a grid"
                            f"{unknown}: expect a confident but meaningless answer.")
    if image_stats is not None:
        img = image_scope(image_stats)
        if not img.inside:
            return img
    return Scope(True, "About shapes, colours, sizes, positions, counts or rendered text: the target's world.")


def image_scope(stats: dict) -> Scope:
    """Rendered scenes are 224×224 with flat colours (a few hundred distinct colours at most, the
    background pattern and anti-aliased edges included); photos have thousands."""
    w, h = stats.get("size", (224, 224))
    if max(w, h) > 2 * min(w, h):
        return Scope(False, f"A {w}×{h} picture: the target's scenes are square renders of shapes.")
    colours = stats.get("colours")
    if colours is not None and colours > 4000:
        return Scope(False, f"A picture with {colours} distinct colours (a photo?): the target only knows flat "
                            "coloured shapes on a plain, striped, speckled or gradient background.")
    return Scope(True, "Looks like a rendered scene of shapes.")


def image_stats_of(image) -> dict:
    """Cheap statistics of a PIL image for `world_scope`: size and distinct colours at 224×224."""
    small = image.convert("RGB").resize((224, 224))
    return {"size": image.size, "colours": len(small.getcolors(224 * 224) or [])}


# ---------------------------------------------------------------- the target's attention, for any run

def chosen_for(profile: list[float], info: dict | None) -> tuple[list[int], bool]:
    """(the layers to star, whether the drafter reads them): a feature drafter's own chosen layers,
    else what the rule picks from this profile."""
    info = info or {}
    own = [int(c) for c in info.get("chosen_layers") or [] if 0 <= int(c) < len(profile)]
    if own:
        return own, bool(info.get("dream_uses_chosen_layers", True))
    return choose_layers(profile)[0], False


def layer_choice_html(profile: list[float] | None, info: dict | None = None) -> str:
    """Why these layers: the rule in words next to the chosen layers, and why lower-entropy layers
    were passed over. `profile` is the target's (a property of the target, shown for every run)."""
    if not profile:
        return ('<div class="mmspec-card"><p>The target\'s attention entropy could not be recomputed for this '
                "model family (its attention is not rebuilt exactly), so no layers are chosen here.</p></div>")
    chosen, reads = chosen_for(profile, info)
    name = drafter_label(plain((info or {}).get("name", ""))) if info else ""
    own = (info or {}).get("target_layers")
    elsewhere = f"this drafter reads layers {plain(own)} instead" if own else "this drafter does not read target layers"
    shown = f"{elsewhere}, so the choice is shown for what a DREAM-style drafter would read"
    who = (f"{name} reads layers {plain(chosen)}" if reads else
           f"The rule chooses layers {plain(chosen)}; " + (shown if info else "no drafter ran"))
    parts = [f"Attention entropy of the target's {len(profile)} decoder layers on this prompt (normalised: 0 = "
             "each query attends to one key, 1 = spread evenly). " + who + ".", LAYER_RULE,
             *skipped_layers(profile, chosen)]
    return '<div class="mmspec-card">' + "".join(f"<p>{html.escape(p)}</p>" for p in parts) + "</div>"
