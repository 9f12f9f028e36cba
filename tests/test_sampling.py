"""Sampling losslessness: committed tokens are distributed exactly as the target's own samples.

Two levels: (1) the tree growth + recursive rejection sampling on a synthetic Markov target and
drafter (small vocabulary, many trials, chi-square against the exact joint of two tokens), with a
control showing the test rejects a wrong verifier; (2) the whole engine on a tiny LLaVA, first two
new tokens against the distribution enumerated from the target's own forwards.
"""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import DEVICE, DTYPE
from mmspec import DecodeConfig, Decoder, load_drafter, load_target
from mmspec.model import CachedModel
from mmspec.tree import grow_tree, parse_tree_spec
from mmspec.verify import Sampling, token_probs, verify
from tiny_models import image

V = 6
gen_tables = torch.Generator().manual_seed(0)
P_LOGITS = torch.randn(V, V, generator=gen_tables) * 1.5  # target: next-token logits given the last token
Q_LOGITS = P_LOGITS + torch.randn(V, V, generator=gen_tables) * 1.2  # drafter: related but different


def _path_last(pool, node, root_tok):
    return root_tok if node < 0 else pool.tokens[node]


def one_step(root_tok, spec, sampling, g, wrong=False):
    def expand(pool, ids):
        return torch.stack([token_probs(Q_LOGITS[_path_last(pool, i, root_tok)], sampling) for i in ids])

    prop = grow_tree(expand, spec, True, g)
    tree = prop.tree
    lasts = [root_tok] + tree.tokens
    logits = torch.stack([P_LOGITS[t] for t in lasts])
    if wrong:  # accept every draft on the first path: what a broken verifier would do
        path, node = [], -1
        kids = tree.children()
        while kids.get(node):
            node = kids[node][0]
            path.append(tree.tokens[node])
        return path + [int(torch.multinomial(token_probs(logits[0], sampling), 1, generator=g))]
    v = verify(tree, logits, sampling, prop.proposals, g)
    return [tree.tokens[n] for n in v.accepted] + [v.next_token]


def sample_two(spec, sampling, n, seed, wrong=False):
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros((V, V))
    for _ in range(n):
        toks, root = [], 0
        while len(toks) < 2:
            new = one_step(root, spec, sampling, g, wrong)
            toks += new
            root = toks[-1]
        counts[toks[0], toks[1]] += 1
    return counts


def exact_two(sampling):
    p1 = token_probs(P_LOGITS[0], sampling)
    return torch.stack([p1[a] * token_probs(P_LOGITS[a], sampling) for a in range(V)]).numpy()


def chi2_pvalue(counts, probs):
    n = counts.sum()
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    exp = probs / probs.sum() * n
    obs = counts.reshape(-1)
    keep = exp >= 5  # pool rare cells so the chi-square approximation holds
    assert obs[exp == 0].sum() == 0, "sampled an outcome of probability zero"
    o = np.append(obs[keep], obs[~keep].sum())
    e = np.append(exp[keep], exp[~keep].sum())
    if e[-1] == 0:
        o, e = o[:-1], e[:-1]
    return chisquare(o, e).pvalue


SHAPES = ["chain:3", "static:[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0]]", "dynamic:8,3,3"]


@pytest.mark.slow  # 4000 draws x 6 settings: 23-52 s each on a busy 2-core CPU
@pytest.mark.parametrize("tree", SHAPES)
@pytest.mark.parametrize("sampling", [Sampling(1.0, 1.0), Sampling(0.7, 0.9)])
def test_tree_rejection_sampling_is_exact(tree, sampling):
    counts = sample_two(parse_tree_spec(tree), sampling, 4000, seed=1)
    assert chi2_pvalue(counts, exact_two(sampling)) > 1e-3


def test_the_statistical_test_catches_a_biased_verifier():
    counts = sample_two(parse_tree_spec("chain:3"), Sampling(1.0, 1.0), 4000, seed=2, wrong=True)
    assert chi2_pvalue(counts, exact_two(Sampling(1.0, 1.0))) < 1e-6


def test_ngram_point_mass_proposals_are_exact():
    """Deterministic candidates (q = point mass) at the root: verification still gives p exactly."""
    sampling = Sampling(1.0, 1.0)
    from mmspec.trace import DraftTree

    tree = DraftTree(tokens=[1, 2, 3], parents=[-1, -1, 0], depths=[1, 1, 2], draft_probs=[1.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(3)
    counts = np.zeros(V)
    logits = torch.stack([P_LOGITS[0], P_LOGITS[1], P_LOGITS[2], P_LOGITS[3]])
    for _ in range(4000):
        v = verify(tree, logits, sampling, {}, g)
        counts[([tree.tokens[n] for n in v.accepted] + [v.next_token])[0]] += 1
    assert chi2_pvalue(counts, token_probs(P_LOGITS[0], sampling).numpy()) > 1e-3


# --- whole engine -------------------------------------------------------------------------------

ENGINE_SAMPLING = Sampling(0.35, 0.95)


def exact_first_two(tgt, prompt, img):
    """p(t1) from the prefill, p(t2 | t1) from a forward of each likely t1; pairs -> prob."""
    cm = CachedModel(tgt.model, tgt.family)
    inputs = tgt.family.prefill_inputs(tgt.processor, img, prompt)
    p1 = token_probs(cm.prefill(inputs).float().cpu(), ENGINE_SAMPLING)
    table = {}
    for a in torch.nonzero(p1 > 0).flatten().tolist():
        cm2 = CachedModel(tgt.model, tgt.family)
        ids = torch.cat([inputs["input_ids"], torch.tensor([[a]])], 1)
        inp = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        p2 = token_probs(cm2.prefill(inp).float().cpu(), ENGINE_SAMPLING)
        for b in torch.nonzero(p2 > 0).flatten().tolist():
            table[(a, b)] = float(p1[a] * p2[b])
    return table


def engine_pair_pvalue(tgt, drafter, tree: str, n: int, prompt="describe the image.", img=None,
                       static_cache: bool | None = None) -> tuple[float, float]:
    """Run the whole engine n times (seeds 0..n-1); chi-square p-value of the first two tokens
    against the exact distribution, and the mean number of accepted drafts per run."""
    img = img if img is not None else image(5)
    table = exact_first_two(tgt, prompt, img)
    keys = sorted(table, key=table.get, reverse=True)
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    accepted = 0
    for seed in range(n):
        # 4 tokens leave room to draft 2 deep after the prefill's token; the test looks at the first two.
        cfg = DecodeConfig(max_new_tokens=4, temperature=ENGINE_SAMPLING.temperature, top_p=ENGINE_SAMPLING.top_p,
                           seed=seed, tree=tree, static_cache=static_cache)
        dec = Decoder(tgt, drafter, img, prompt, cfg)
        for _ in dec:
            pass
        pair = tuple(dec.result.token_ids[:2])
        assert pair in index, f"sampled {pair}, which has probability zero"
        counts[index[pair]] += 1
        accepted += sum(s.accepted_len for s in dec.result.steps)
    return chi2_pvalue(counts, np.array([table[k] for k in keys])), accepted / n


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["chain:3", "dynamic:8,3,3"])
def test_engine_sampling_matches_target_distribution(tiny_dir, tree):
    tgt = load_target(str(tiny_dir / "llava-peaky"), DEVICE, DTYPE)
    drafter = load_drafter(str(tiny_dir / "llava-peaky-draft"), tgt)
    pvalue, accepted = engine_pair_pvalue(tgt, drafter, tree, n=1000)
    assert accepted > 0.2, "the drafter should get some drafts accepted, or the test proves little"
    assert pvalue > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["chain:3", "dynamic:8,3,3"])
def test_fast_path_sampling_matches_target_distribution(tiny_dir, tree):
    """The static fast path drafts chains and dynamic trees on the device (Gumbel-max / Gumbel-top-k
    from device noise, no host round trip per token or level): still exactly the target's distribution."""
    tgt = load_target(str(tiny_dir / "llava-peaky"), DEVICE, DTYPE)
    drafter = load_drafter(str(tiny_dir / "llava-peaky-draft"), tgt)
    pvalue, accepted = engine_pair_pvalue(tgt, drafter, tree, n=1000, static_cache=True)
    assert accepted > 0.2
    assert pvalue > 1e-3
