"""Token-level HTML: tokens coloured by fate, pane headers, the legend and the vanilla/speculative diff.

Fates (one `<span class="tok tok-FATE">` per token, in generation order):
- accepted:   a draft token the target accepted;
- correction: the target's own token after a rejected draft;
- bonus:      the target's token after a fully accepted draft path (free extra token);
- target:     the target's token when nothing was drafted (prefill, vanilla, no n-gram match);
- rejected:   draft tokens that were proposed and thrown away (not part of the output; hidden by CSS
              unless `mmspec-show-rejected` is set on an ancestor, e.g. <body>).

Every token text is escaped (`html.escape`), newlines show as ⏎ (and break the line), tabs as ⇥,
control / byte-fallback characters as \\xNN, empty tokens as ∅.
"""
from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass

from mmspec.trace import Generation, StepRecord

FATES = ("accepted", "correction", "bonus", "target", "rejected")
FATE_LABELS = {
    "accepted": "accepted draft",
    "correction": "correction (target, after a rejection)",
    "bonus": "bonus (target, after a fully accepted draft)",
    "target": "target only (nothing drafted)",
    "rejected": "rejected draft (not in the output)",
}


@dataclass
class TokenFate:
    text: str
    token: int
    fate: str
    step: int
    depth: int  # 0 for tokens that were not drafted (prefill, vanilla)
    t: float  # elapsed seconds at the end of the step that produced it
    q: float | None = None  # draft probability
    p: float | None = None  # target probability of this token
    note: str = ""

    @property
    def committed(self) -> bool:
        return self.fate != "rejected"


# ---------------------------------------------------------------- text escaping

def visible_text(text: str) -> str:
    """Plain (unescaped) text with whitespace and control characters made visible, for labels/tooltips."""
    if text == "":
        return "∅"
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") :
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def token_html(text: str) -> str:
    """The inside of a token span: escaped, newlines as ⏎ + a real line break, bytes as badges."""
    if text == "":
        return '<span class="tok-byte">∅</span>'
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎\n")
        elif ch == "\t":
            out.append("⇥\t")
        elif ch == "\r":
            out.append('<span class="tok-byte">␍</span>')
        elif ch == "\ufffd":
            out.append('<span class="tok-byte" title="incomplete UTF-8 byte sequence">\ufffd</span>')
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            code = f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
            out.append(f'<span class="tok-byte">{code}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def esc(value) -> str:
    """Any value (text or a number from a trace) as HTML text or attribute: escaped once, here."""
    return html.escape(str(value), quote=True)


def quoted(text: str) -> str:
    return "‘" + visible_text(text) + "’"


# ---------------------------------------------------------------- vocab from traces

def token_vocab(*gens: Generation | None, extra: dict | None = None) -> dict[int, str]:
    """id -> text for every token whose text appears somewhere in the traces (plus `extra`)."""
    vocab: dict[int, str] = {}
    for g in gens:
        if g is None:
            continue
        for s in g.steps:
            vocab.update(zip(s.tree.tokens, s.node_texts))
            vocab.update(zip(s.new_tokens, s.new_texts))
            vocab[s.next_token] = s.next_text
    for k, v in (extra or {}).items():
        vocab[int(k)] = v
    return vocab


def token_texts(gen: Generation) -> list[str]:
    """Text of every committed token, aligned with `gen.token_ids`."""
    return [t for s in gen.steps for t in s.new_texts]


# ---------------------------------------------------------------- fates

def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def rejected_branch(step: StepRecord) -> list[int]:
    """Rejected draft nodes shown inline: from the last accepted node (or the root), its first-ranked
    child and that child's first-ranked descendants (what the drafter wanted to say)."""
    tree = step.tree
    if len(tree) == 0 or step.next_kind != "correction":
        return []
    kids = tree.children()
    node = step.accepted[-1] if step.accepted else -1
    out = []
    while kids.get(node):
        node = kids[node][0]
        out.append(node)
    return out


def step_fates(step: StepRecord, vocab: dict[int, str] | None = None) -> list[TokenFate]:
    """Tokens of one step in reading order: accepted drafts, rejected drafts, then the target's token."""
    vocab = vocab or {}
    tree = step.tree
    out: list[TokenFate] = []
    n_acc = len(step.accepted)
    for i, (tok, text) in enumerate(zip(step.new_tokens, step.new_texts)):
        if step.kind in ("prefill", "vanilla") or len(tree) == 0:
            note = "first token, from the prompt (prefill) forward" if step.kind == "prefill" else (
                "vanilla decoding: one token per target forward" if step.kind == "vanilla" else "nothing drafted this step")
            out.append(TokenFate(text, tok, "target", step.index, 0, step.elapsed_s, note=note))
            continue
        if i < n_acc:
            node = step.accepted[i]
            out.append(TokenFate(text, tok, "accepted", step.index, tree.depths[node], step.elapsed_s,
                                 q=tree.draft_probs[node], p=step.target_probs[node]))
            continue
        # the target's own token after the accepted path
        rejected = rejected_branch(step) if step.next_kind == "correction" else []
        parent = step.accepted[-1] if step.accepted else -1
        n_siblings = sum(1 for p in tree.parents if p == parent)
        for j, node in enumerate(rejected):
            want = vocab.get(step.target_tokens[node]) if step.target_tokens else None
            note = ""
            if j == 0:
                note = f"target wanted {quoted(want)}" if want is not None and step.target_tokens[node] != tree.tokens[node] else ""
                if n_siblings > 1:
                    note += ("; " if note else "") + f"{n_siblings - 1} other candidate(s) also rejected here"
            else:
                note = "never checked: its parent was rejected"
            out.append(TokenFate(step.node_texts[node], tree.tokens[node], "rejected", step.index, tree.depths[node],
                                 step.elapsed_s, q=tree.draft_probs[node], p=step.target_probs[node], note=note))
        kind = step.next_kind if step.next_kind in ("bonus", "correction") else "target"
        note = {
            "bonus": "every draft on the path was accepted: the target's next token comes for free",
            "correction": "the target's token where the draft was rejected",
            "target": "nothing drafted this step",
        }[kind]
        out.append(TokenFate(text, tok, kind, step.index, n_acc + 1, step.elapsed_s, note=note))
    return out


def fates(gen: Generation, vocab: dict[int, str] | None = None) -> list[TokenFate]:
    vocab = vocab if vocab is not None else token_vocab(gen)
    return [f for s in gen.steps for f in step_fates(s, vocab)]


def fate_counts(gen: Generation) -> dict[str, int]:
    counts = dict.fromkeys(FATES, 0)
    for f in fates(gen):
        counts[f.fate] += 1
    return counts


# ---------------------------------------------------------------- HTML

def tooltip(f: TokenFate) -> str:
    head = FATE_LABELS[f.fate].split(" (")[0]
    lines = [f"{quoted(f.text)} · {head} · step {f.step}" + (f" · depth {f.depth}" if f.depth else "")]
    if f.q is not None or f.p is not None:
        ratio = "–"
        if f.q and f.p is not None:
            ratio = f"{min(1.0, f.p / f.q):.3f}"
        lines.append(f"draft q = {_fmt(f.q)} · target p = {_fmt(f.p)} · min(1, p/q) = {ratio}")
    if f.note:
        lines.append(f.note)
    lines.append(f"t = {f.t:.3f} s")
    return "\n".join(lines)


def span(f: TokenFate) -> str:
    return (f'<span class="tok tok-{esc(f.fate)}" data-step="{esc(f.step)}" data-depth="{esc(f.depth)}" '
            f'title="{esc(tooltip(f))}">{token_html(f.text)}</span>')


def step_spans(gen: Generation, vocab: dict[int, str] | None = None) -> list[str]:
    """One HTML string per step (its token spans): joining a prefix gives the text up to that step."""
    vocab = vocab if vocab is not None else token_vocab(gen)
    return ["".join(span(f) for f in step_fates(s, vocab)) for s in gen.steps]


def tokens_html(gen: Generation, upto_step: int | None = None, vocab: dict[int, str] | None = None,
                wrap: bool = True, show_rejected: bool = False) -> str:
    """Coloured tokens of steps[:upto_step] (all by default); `wrap` adds the styled container div."""
    parts = step_spans(gen, vocab)
    body = "".join(parts if upto_step is None else parts[:upto_step])
    if not wrap:
        return body
    cls = "mmspec-tokens mmspec-show-rejected" if show_rejected else "mmspec-tokens"
    return f'<div class="{cls}">{body}</div>'


def legend_html(counts: dict[str, int] | None = None) -> str:
    samples = {"accepted": "draft", "correction": "fix", "bonus": "bonus", "rejected": "rejected", "target": "plain"}
    items = []
    for fate in ("accepted", "correction", "bonus", "rejected", "target"):
        n = f" <b>{esc(counts[fate])}</b>" if counts and fate in counts else ""
        items.append(f'<span class="key"><span class="tok tok-{fate}">{samples[fate]}</span>'
                     f' <span class="desc">{html.escape(FATE_LABELS[fate])}</span>{n}</span>')
    return '<div class="mmspec-legend">' + "".join(items) + "</div>"


# ---------------------------------------------------------------- end of text

END_TEXTS = frozenset({"</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"})


def ends_with_eos(gen: Generation, eos_ids: set[int] | None) -> bool:
    """Whether the run's last token is end-of-text. The engine stops only at EOS or max_new_tokens,
    so a run shorter than its limit ended on EOS; at the limit, the token's id or text decides."""
    if not gen.token_ids:
        return False
    if eos_ids is not None:
        return gen.token_ids[-1] in eos_ids
    limit = gen.config.get("max_new_tokens")
    last_text = next((s.new_texts[-1] for s in reversed(gen.steps) if s.new_texts), "")
    return (isinstance(limit, int) and len(gen.token_ids) < limit) or last_text.strip() in END_TEXTS


def content_texts(gen: Generation) -> list[str | None]:
    """Committed token texts with the end-of-text token as None (drawn as an end marker, never as text)."""
    texts: list[str | None] = list(token_texts(gen))
    if texts and ends_with_eos(gen, None):
        texts[-1] = None
    return texts


# ---------------------------------------------------------------- diff

def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, len(shorter) if one is a prefix of the other, None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def diff_html(vanilla: Generation | None, spec: Generation | None) -> str:
    """'identical' or the first divergence, with both outputs token by token around it."""
    if vanilla is None or spec is None:
        return '<div class="mmspec-diff">Needs both a vanilla and a speculative run (this trace has one).</div>'
    a, b = vanilla.token_ids, spec.token_ids
    i = first_divergence(a, b)
    temp = float(spec.config.get("temperature", 0.0) or 0.0)
    if i is None:
        return (f'<div class="mmspec-diff"><span class="same">✓ identical</span>: {len(a)} tokens, token for token'
                f'{" (as losslessness requires at temperature 0)" if temp == 0 else ""}.</div>')
    ta, tb = content_texts(vanilla), content_texts(spec)

    def show(text: str | None) -> str:
        return '<span class="tok tok-end" title="end of text">■ end</span>' if text is None else token_html(text)

    def side(texts: list[str | None], ids: list[int]) -> str:
        lo = max(0, i - 40)
        pre = "".join(show(t) for t in texts[lo:i])
        here = (f'<span class="tok tok-diverge" title="token {i}: id {esc(ids[i])}">{show(texts[i])}</span>'
                if i < len(texts) else '<span class="tok tok-diverge">[end]</span>')
        post = "".join(show(t) for t in texts[i + 1 : i + 30])
        return ("…" if lo else "") + pre + here + f'<span class="sub" style="opacity:.55">{post}</span>'

    why = ("Sampling at temperature > 0: both runs draw from the same distribution but not the same random "
           "numbers, so outputs may differ." if temp > 0 else
           "At temperature 0 the outputs must match. A divergence means a near-tie in the target's logits that "
           "batched verification resolved differently from one-token decoding (bf16/fp16 on GPU), or a bug.")
    return (f'<div class="mmspec-diff"><span class="differ">✗ differs at token {i}</span> '
            f'(vanilla {len(a)} tokens, speculative {len(b)}). {esc(why)}'
            f'<div>vanilla:</div><div class="side">{side(ta, a)}</div>'
            f'<div>speculative:</div><div class="side">{side(tb, b)}</div></div>')
