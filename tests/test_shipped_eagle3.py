"""mmspec's EAGLE-3 drafter, assets/models/mmspec-feat-eagle3, is a head in the vLLM / SGLang format.

Checked on the real shipped head and the embedded target (CPU, no hub): the registry loads it as an
eagle3 head; `export-eagle3` then loading the export drafts exactly what loading it directly drafts
on held-out prompts of the embedded world (chain and dynamic tree, greedy: same draft trees, same
accepted lengths, same tokens and tau); the exported safetensors holds exactly the tensors, with the
shapes, that its config implies (test_eagle3_head's list, from the format, not the module's) and nothing
else, and config.json names the architecture and the same aux layers in both engines' conventions. The
retired eagle3 feature drafter (a fused-feature network that stood in for EAGLE-3 before) is refused
by load, by export and by `train_feature --variant eagle3`, each with one line naming the way to the
format head. Nothing here depends on the shipped head's aux layers or sizes: they are read from its files.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmspec import DecodeConfig, InputError, generate, load_drafter, load_target
from mmspec.cli import main as cli_main
from mmspec.drafters import registry
from mmspec.load import ASSETS
from test_eagle3_head import vllm_expected  # the format's tensors from config.json, written apart from the module

SHIPPED = ASSETS / "models" / "mmspec-feat-eagle3"
NEW_TOKENS = 32
TREES = ("chain:4", "dynamic:24,5,4")


def file_shapes(path) -> dict[str, list[int]]:
    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def format_mismatch(weights, raw: dict) -> dict[str, list[str]]:
    """Tensors a safetensors file holds beyond the format's list, lacks from it, or holds in another shape."""
    got, want = file_shapes(weights), vllm_expected(raw, own_embed=False)
    return {"extra": sorted(set(got) - set(want)), "missing": sorted(set(want) - set(got)),
            "shape": sorted(k for k in set(got) & set(want) if got[k] != want[k])}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a second thread only contends on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("shipped_eagle3") / "head"
    assert cli_main(["export-eagle3", str(SHIPPED), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def target():
    return load_target(None, "cpu", "float32")  # the embedded target the head was trained for


def test_the_shipped_eagle3_drafter_is_a_format_head():
    assert registry.find(str(SHIPPED)).kind == "eagle3"
    meta = json.loads((SHIPPED / "mmspec_drafter.json").read_text())
    assert meta["name"] == SHIPPED.name, "the training record names the directory it ships in"
    assert (SHIPPED / "README.md").read_text().startswith(f"# {SHIPPED.name}\n")
    menu = registry.choices(SHIPPED.parent)
    assert [s for _, s in menu].count(str(SHIPPED)) == 1 and str(SHIPPED) in registry.benchmarked(SHIPPED.parent)
    feature = [s for _, s in menu if "/mmspec-feat-" in s]
    assert feature[feature.index(str(SHIPPED)) - 1].endswith("mmspec-feat-eagle"), "in the research list's order"
    assert not any("eagle3-head" in s for _, s in menu)


def test_export_writes_exactly_the_format(exported):
    raw = json.loads((exported / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["num_hidden_layers"] == 1
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    aux = raw["eagle_aux_hidden_state_layer_ids"]  # vLLM reads these as they are
    assert raw["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux], "use_aux_hidden_state": True}
    assert aux == json.loads((SHIPPED / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]
    assert format_mismatch(exported / "model.safetensors", raw) == {"extra": [], "missing": [], "shape": []}
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert str(f.get_slice("d2t").get_dtype()) == "I64"


def test_the_format_check_sees_an_extra_missing_or_misshapen_tensor(exported, tmp_path):
    """A control for the check above: copies of the exported file with one tensor too many, one too
    few, and one transposed are each reported."""
    raw = json.loads((exported / "config.json").read_text())
    state = load_file(str(exported / "model.safetensors"))
    copies = {"extra": {**state, "fc.bias": torch.zeros(raw["hidden_size"])},
              "missing": {k: v for k, v in state.items() if k != "norm.weight"},
              "shape": {**state, "fc.weight": state["fc.weight"].t().contiguous()}}
    for what, tensors in copies.items():
        path = tmp_path / f"{what}.safetensors"
        save_file(tensors, str(path))
        found = format_mismatch(path, raw)
        assert found[what] == [{"extra": "fc.bias", "missing": "norm.weight", "shape": "fc.weight"}[what]], found


def test_export_then_load_drafts_the_same(exported, target):
    from mmspec.world import held_out_seeds, sample_example

    direct, via_export = load_drafter(str(SHIPPED), target), load_drafter(str(exported), target)
    assert direct.kind == via_export.kind == "eagle3"
    taus = []
    for seed in held_out_seeds(2, offset=950_000):
        img, qa, _ = sample_example(seed)
        for tree in TREES:
            a, b = (generate(target, d, img, qa.prompt, DecodeConfig(max_new_tokens=NEW_TOKENS, tree=tree))
                    for d in (direct, via_export))
            where = f"seed {seed} {tree}"
            assert a.token_ids == b.token_ids, where
            assert [s.tree.tokens for s in a.steps] == [s.tree.tokens for s in b.steps], where
            exact = "exactly equal on CPU fp32: export copies the weights bit for bit"
            assert [s.accepted_len for s in a.steps] == [s.accepted_len for s in b.steps], f"{where}: {exact}"
            assert a.stats.tau == b.stats.tau, f"{where}: tau {a.stats.tau} vs {b.stats.tau}, {exact}"
            taus.append(a.stats.tau)
    assert min(taus) > 1.5, taus  # the trained head's drafts are accepted: the comparison covered accepted paths


def retired_eagle3(tmp_path, tiny_dir):
    """An old download of the retired eagle3 feature drafter, as it was saved (variant and fused-feature
    config), built from a tiny target's plain EAGLE drafter."""
    from mmspec.drafters.feature.drafter import create_feature_drafter
    from mmspec.drafters.feature.files import META_FILE, save_feature_drafter

    tgt = load_target(str(tiny_dir / "llava"), "cpu", "float32")
    path = save_feature_drafter(create_feature_drafter("eagle", tgt, profile=[1.0, 1.0]), tmp_path / "old-eagle3")
    meta = json.loads((path / META_FILE).read_text())
    meta.update(variant="eagle3", config={**meta["config"], "variant": "eagle3", "fuse3": True, "fuse_layers": [1, 1, 2]})
    (path / META_FILE).write_text(json.dumps(meta))
    return tgt, path


def test_the_retired_eagle3_feature_drafter_is_refused(tmp_path, tiny_dir, capsys):
    tgt, old = retired_eagle3(tmp_path, tiny_dir)
    with pytest.raises(InputError, match="retired pre-format eagle3 drafter") as e:
        load_drafter(str(old), tgt)
    assert "\n" not in str(e.value) and "train_eagle3" in str(e.value) and "export-eagle3" in str(e.value)
    argv = ["generate", "--target", str(tiny_dir / "llava"), "--drafter", str(old), "--prompt", "describe",
            "--max-new-tokens", "2", "--device", "cpu"]
    capsys.readouterr()  # (loading the tiny target above wrote a progress bar)
    assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "retired" in err and len(err.splitlines()) == 1, err
    assert cli_main(["export-eagle3", str(old), str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert "retired pre-format eagle3 drafter" in err and len(err.splitlines()) == 1, err


def test_train_feature_names_the_format_trainer_for_eagle3():
    from mmspec.train_feature import parse_variants

    with pytest.raises(InputError, match=r"python -m mmspec\.train_eagle3 --out OUT/mmspec-feat-eagle3") as e:
        parse_variants(["dream,eagle3"])
    assert "\n" not in str(e.value)
    assert "eagle3" not in parse_variants(["all"]) and parse_variants(["eagle,dream"]) == ["eagle", "dream"]
