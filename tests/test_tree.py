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
