"""Cost of a feature-drafter training step: the trainer before the device cache (the frozen copy in
tests/feat_loss_reference.py) against mmspec.train_feature, on the same sequences and drafters.

Per mode: time per sample of a step (the old one includes its target pass; the new one gathers from
a FeatureCache built once, whose cost per sequence is printed apart), and, for one step, the number
of dispatched kernel-type operators (views excluded, optimizer excluded: it is one fused kernel on
CUDA), of operators that synchronise a GPU with the host (nonzero, item), and of host arrays turned
into tensors (each one a host-to-device copy on a GPU). On a CPU the time is mostly arithmetic; the
counts are what bounds these tiny drafters on a GPU.

    python bench/train_feature_cost.py --variant eagle,dream,vispec,aasd --batch 8 --steps 3
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import feat_loss_reference as ref  # noqa: E402
from mmspec import train_feature as tf  # noqa: E402
from mmspec.drafters.feature.net import FeatNet, Shared, make_config  # noqa: E402
from mmspec.load import load_target  # noqa: E402

VIEWS = {"aten.view", "aten.t", "aten.unsqueeze", "aten.slice", "aten.expand", "aten._unsafe_view", "aten.detach",
         "aten.transpose", "aten.reshape", "aten.permute", "aten.select", "aten.alias", "aten.as_strided",
         "aten.squeeze", "aten.split", "aten.unbind", "aten._reshape_alias", "aten.lift_fresh", "aten.split_with_sizes"}
SYNCS = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select"}


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def step(nets, opts, fn, sb, counter=None):
    for v, net in nets.items():
        loss, _ = fn(net, sb, 0.6)
        opts[v].zero_grad()
        loss.backward()
        if counter is not None:  # the optimizer is not counted
            counter.__exit__(None, None, None)
        opts[v].step()
        if counter is not None:
            counter.__enter__()


def measure(mode, nets, opts, target, batches, need, B):
    """Median time per sample of the steps after the first, and the counts of the last step."""
    fn = ref.variant_loss if mode == "old" else tf.variant_loss
    if mode == "new":
        t = time.perf_counter()
        cache = tf.FeatureCache(target, need)
        for b in batches:
            cache.add(b)
        cache.finish()
        for n in nets.values():
            cache.plan(n.cfg)
        print(f"new: building the cache (target pass + plans) {1000 * (time.perf_counter() - t) / cache.n:.1f} ms "
              "per sequence, once")

    def shared(s):
        return ref.target_pass(target, batches[s], need) if mode == "old" else cache.view(np.arange(s * B, (s + 1) * B))

    times = []
    for s in range(len(batches) - 1):
        t = time.perf_counter()
        step(nets, opts, fn, shared(s))
        if s:
            times.append((time.perf_counter() - t) / B)
    made, from_numpy = [0], torch.from_numpy

    def counted(a):
        made[0] += 1
        return from_numpy(a)

    torch.from_numpy = counted
    with OpCount() as c:
        step(nets, opts, fn, shared(len(batches) - 1), c)
    torch.from_numpy = from_numpy
    kernels = sum(n for k, n in c.ops.items() if k not in VIEWS)
    syncs = {k: n for k, n in c.ops.items() if k in SYNCS}
    print(f"{mode}: {1000 * statistics.median(times):.1f} ms per sample per step (median of {len(times)}); one step: "
          f"{kernels} kernel-type ops, sync ops {syncs or 0}, host arrays made tensors {made[0]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="assets/models/mmspec-target")
    ap.add_argument("--variant", default="eagle,dream,vispec,aasd")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (plus one untimed warm-up and one counted)")
    ap.add_argument("--max-answer", type=int, default=160)
    args = ap.parse_args()
    torch.set_num_threads(1)  # repeatable on a shared machine
    target = load_target(args.target, "cpu", "float32")
    L = target.model.config.text_config.num_hidden_layers
    choice = ([3, 6, L - 1], 3) if L >= 8 else ([0, L - 1], 0)
    seeds = [tf.SEED_BASE + i for i in range(args.batch * (args.steps + 2))]
    batches = [tf.Collate(0)(items) for items in tf.item_loader(target, seeds, args.batch, 0, args.max_answer)]
    for mode in ("old", "new"):
        torch.manual_seed(0)
        nets = {v: FeatNet(make_config(v, target.model, choice), Shared(target.model)).train()
                for v in tf.parse_variants([args.variant])}
        opts = {v: torch.optim.AdamW(n.parameters(), lr=1e-3) for v, n in nets.items()}
        measure(mode, nets, opts, target, batches, tf.needs(nets), args.batch)


if __name__ == "__main__":
    main()
