"""The drafters registry: one row per drafter kind, and `load_drafter`, which walks it.

A drafter spec (`--drafter`, the app's drafter box, bench/speed.py's `--drafters`) is a keyword
("ngram", "random"), a directory or a hub id; the first row whose `recognise` accepts it loads it.
"vanilla" (also None, "" and "none") means no drafter. Rows are in recognition order: keywords
first, then the directory formats from the most specific to the least (an mmspec-trained EAGLE-3
head also carries mmspec_drafter.json, so heads come before feature drafters; any save_pretrained
directory or hub id is a draft model, the last row). Adding a drafter is one module beside this one
and one row in `KINDS`. The research list's drafters shipped for the embedded target
(assets/models/mmspec-feat-*) are feature drafters and one EAGLE-3 format head, mmspec-feat-eagle3,
which the eagle3 row loads and the menu lists among them.

What reads it: the CLI (--drafter's help, and the spec checked before the target loads), the app's
drafter menu (`choices`), the web UI's model-free names (`model_free_names`, `is_model_free`) and
bench/speed.py's default drafters (`benchmarked`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mmspec.drafters.base import Drafter
from mmspec.drafters.eagle3_head import is_eagle3_head, load_eagle3_head
from mmspec.drafters.feature.files import META_FILE, is_feature_drafter, load_feature_drafter
from mmspec.drafters.model import is_model_spec, load_model_drafter
from mmspec.drafters.ngram import NgramDrafter
from mmspec.drafters.noise import RandomDrafter
from mmspec.errors import InputError
from mmspec.load import ASSETS

SHIPPED = ASSETS / "models"  # the embedded target and the drafters shipped for it
NO_DRAFTER = "vanilla"  # the target alone
_NO_DRAFTER_NAMES = (None, "", NO_DRAFTER, "none")

Menu = list[tuple[str, str]]  # (human label, spec)


@dataclass(frozen=True)
class DrafterKind:
    """One row: how a spec is recognised and loaded, and how the kind appears to people."""

    kind: str  # the loaded drafter's `kind`
    label: str  # what it is, in --drafter's help and the unknown-drafter error
    recognise: Callable[[Any], bool]  # whether a spec names one (may refuse a spec that cannot be one: InputError)
    load: Callable[[Any, Any], Drafter]  # (spec, target) -> the drafter
    keyword: str | None = None  # the spec itself, for a kind that needs no files
    model_free: bool = False  # needs no model: fine with any target, cheap to make per request
    shipped: Callable[[Path], Menu] = lambda models_dir: []  # instances under assets/models, in menu order
    menu: int = 0  # where its instances sit in the app's menu (lower first; model-free kinds come last; see _shipped)
    benchmark: bool = True  # in bench/speed.py's default drafters


def _is(word: str) -> Callable[[Any], bool]:
    return lambda spec: spec == word


def _keyword_menu(label: str, word: str) -> Callable[[Path], Menu]:
    return lambda models_dir: [(label, word)]


def _shipped_models(models_dir: Path) -> Menu:
    out = []
    for name, label in (("mmspec-draft-vlm", "draft VLM (embedded, sees the image)"),
                        ("mmspec-draft-text", "text-only LM (embedded, blind to the image)")):
        if (models_dir / name).exists():
            out.append((label, str(models_dir / name)))
    return out


def _research_list(models_dir: Path) -> list[Path]:
    """The research list's drafters trained for the embedded target (mmspec-feat-*), in menu order:
    ViSpec first (its compression map is the visual-token view the app teaches with), then by name.
    Most are feature drafters (EAGLE family); the EAGLE-3 one is a head in the vLLM / SGLang format."""
    return sorted(models_dir.glob("mmspec-feat-*"), key=lambda p: (p.name != "mmspec-feat-vispec", p.name))


def _shipped_feature_drafters(models_dir: Path) -> Menu:
    return [(f"feature drafter: {p.name.removeprefix('mmspec-feat-')} (reads target features)", str(p))
            for p in _research_list(models_dir) if (p / META_FILE).exists() and not is_eagle3_head(p)]


def _shipped_eagle3_heads(models_dir: Path) -> Menu:
    return [(f"feature drafter: {p.name.removeprefix('mmspec-feat-')} (EAGLE-3 head in the vLLM / SGLang format)",
             str(p)) for p in _research_list(models_dir) if is_eagle3_head(p)]


KINDS: tuple[DrafterKind, ...] = (
    DrafterKind("ngram", "prompt lookup", _is("ngram"), lambda spec, target: NgramDrafter(),
                keyword="ngram", model_free=True, shipped=_keyword_menu("n-gram (prompt lookup)", "ngram"), menu=0),
    DrafterKind("random", "worst case", _is("random"),
                lambda spec, target: RandomDrafter(len(target.tokenizer)), keyword="random", model_free=True,
                shipped=_keyword_menu("random (worst case)", "random"), menu=1, benchmark=False),
    # config.json naming LlamaForCausalLMEagle3 (vLLM / SGLang / SpecForge format), or an mmspec-trained head
    # (the shipped one, mmspec-feat-eagle3, sits among the feature drafters: same menu position)
    DrafterKind("eagle3", "an EAGLE-3 head directory (vLLM / SGLang / SpecForge format)", is_eagle3_head,
                load_eagle3_head, shipped=_shipped_eagle3_heads, menu=1),
    # a directory with mmspec_drafter.json: an EAGLE-family feature drafter trained by mmspec
    DrafterKind("feature", "an mmspec feature-drafter directory", is_feature_drafter, load_feature_drafter,
                shipped=_shipped_feature_drafters, menu=1),
    DrafterKind("model", "a draft model (directory or hub id)", is_model_spec, load_model_drafter,
                shipped=_shipped_models, menu=0),
)


def help_text() -> str:
    """What --drafter accepts, in words."""
    words = [f"{NO_DRAFTER} (no drafter)"] + [f"{k.keyword} ({k.label})" for k in KINDS if k.keyword]
    places = [k.label for k in KINDS if not k.keyword]
    return ", ".join(words) + ", or " + ", ".join(places[:-1]) + " or " + places[-1]


def find(spec) -> DrafterKind | None:
    """The row that recognises `spec` (None: no drafter); an unknown spec is an InputError."""
    if spec in _NO_DRAFTER_NAMES:
        return None
    for k in KINDS:
        if k.recognise(spec):
            return k
    raise InputError(f"unknown drafter {spec!r}: use {help_text()}")


def load_drafter(name: str | None, target, device: str | None = None, dtype: str | None = None) -> Drafter | None:
    """`vanilla`/None -> no drafter; else the drafter the first recognising row loads for `target`
    (device and dtype are the target's; the arguments are accepted for older callers)."""
    kind = find(name)
    return None if kind is None else kind.load(name, target)


def _shipped(models_dir: Path, model_free: bool) -> list[tuple[DrafterKind, tuple[str, str]]]:
    """(row, (label, spec)) of the shipped instances of the model-free rows or of the others, in menu
    order: by the rows' `menu`; rows sharing a position (the research list's feature drafters and its
    EAGLE-3 head) interleave in the research list's order, other instances keep their row's order."""
    rank = {str(p): i for i, p in enumerate(_research_list(models_dir))}
    found = [((k.menu, rank.get(spec, -1), n), k, (label, spec)) for k in KINDS if k.model_free == model_free
             for n, (label, spec) in enumerate(k.shipped(models_dir))]
    return [(k, c) for _, k, c in sorted(found, key=lambda f: f[0])]


def choices(models_dir: Path | None = SHIPPED, extra: Iterable[tuple[str, str]] = ()) -> Menu:
    """The app's drafter menu, (label, spec): the drafters shipped in `models_dir` (None: none), then
    `extra`, then the model-free drafters not already listed."""
    out: Menu = []
    if models_dir is not None:
        out += [c for _, c in _shipped(Path(models_dir), model_free=False)]
    out += [tuple(c) for c in extra]
    listed = {v for _, v in out}
    out += [c for _, c in _shipped(SHIPPED, model_free=True) if c[1] not in listed]
    return out


def benchmarked(models_dir: Path = SHIPPED) -> list[str]:
    """bench/speed.py's default drafters: the menu's, less the kinds not worth timing (random)."""
    return [spec for free in (False, True) for k, (_, spec) in _shipped(Path(models_dir), free) if k.benchmark]


def model_free_names() -> tuple[str, ...]:
    """Drafters that need no model: allowed with any target (the public app's policy)."""
    return tuple(k.keyword for k in KINDS if k.model_free)


def is_model_free(spec) -> bool:
    """No model to load or cache for `spec`: no drafter, or a model-free kind (made fresh per request)."""
    return spec in _NO_DRAFTER_NAMES or spec in model_free_names()
