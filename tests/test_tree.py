"""Tree attention masks: the per-level construction equals the definition (ancestor-or-self)."""
import random

import torch

from mmspec.tree import tree_attention


def ancestors_by_definition(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    for row in range(n + 1):
        node = row
        while True:  # walk up to the root, marking every node on the way
            mask[row, node] = True
            if node == 0:
                break
            node = parents[node - 1] + 1
    return mask


def test_tree_attention_on_random_trees():
    rng = random.Random(0)
    shapes = [[], [-1], [-1, 0, 1, 2], [-1, -1, -1]]  # empty, one node, chain, star
    shapes += [[rng.randint(-1, i - 1) for i in range(rng.randint(1, 40))] for _ in range(300)]
    for parents in shapes:
        assert torch.equal(tree_attention(parents), ancestors_by_definition(parents)), parents


def test_tree_attention_is_built_on_the_requested_device():
    mask = tree_attention([-1, 0, 0, 1], device="cpu")
    assert mask.device.type == "cpu" and mask.dtype == torch.bool and mask.shape == (5, 5)


def test_device_tree_verify_inputs_match_its_host_tree():
    """What the target's verify forward reads of a device-grown tree (tokens, depths, ancestor mask,
    made on the device) is what the host tree that arrives later says; slots past the tree are
    verified and ignored. Some children have q = 0 (invalid), so fewer nodes than the budget exist."""
    from mmspec import device_tree
    from mmspec.tree import parse_tree_spec

    V = 12
    table = torch.softmax(torch.randn(V + 1, V, generator=torch.Generator().manual_seed(0)) * 2, -1)
    table[:, 3:] = 0.0  # three tokens only: with top-4 children every node has an invalid child
    table = table / table.sum(-1, keepdim=True)

    def expand(depth, tokens, feeds, rows, allowed):
        return table[tokens], feeds

    for spec_s in ("dynamic:16,5,3", "dynamic:70,6,4", "dynamic:4,2,2", "dynamic:7,1,3"):
        spec = parse_tree_spec(spec_s)
        for root in range(3):
            t = device_tree.grow(expand, table[V - root], torch.zeros(1), spec, torch.tensor(5), torch.arange(64), None)
            tree, _ = device_tree.PendingTree(t, spec).host()
            n = len(tree)
            assert 0 < n <= spec.budget
            assert t.verify_tokens[:n].tolist() == tree.tokens
            assert t.verify_offsets[: 1 + n].tolist() == [0] + tree.depths
            assert torch.equal(t.verify_mask[: 1 + n, : 1 + n], tree_attention(tree.parents)), (spec_s, root)
            if spec_s == "dynamic:70,6,4":  # fewer valid nodes than the budget: invalid slots are verified, ignored
                assert n < spec.budget == t.verify_tokens.shape[0]
