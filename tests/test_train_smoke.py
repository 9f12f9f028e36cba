"""CPU smoke run of mmspec.train: loss goes down, saved models load back with plain transformers."""
import json

import pytest
import torch

from mmspec import train
from mmspec.world import build_messages, format_answer, format_prompt, sample_example

pytestmark = pytest.mark.slow  # every test shares a CPU training run of the target and both drafters


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_models")
    train.main(["all", "--smoke", "--out", str(out), "--device", "cpu", "--quick-eval", "0", "--steps-target", "40",
                "--steps-draft", "10"])
    return out


def test_loss_decreases(smoke_out):
    log = json.loads((smoke_out / "mmspec-target" / "train_log.json").read_text())
    losses = [l for _, l in log["train_loss"]]
    assert losses[-1] < losses[0] - 1.0
    ev = [e[1] for e in log["eval_loss"]]
    assert ev[-1] < ev[0]
    for name in ("mmspec-draft-vlm", "mmspec-draft-text"):
        d = json.loads((smoke_out / name / "train_log.json").read_text())
        assert d["loss"] and (smoke_out / name / "README.md").exists()
    card = (smoke_out / "mmspec-target" / "README.md").read_text()
    assert "Measured quality" in card and "measured-quality:start" in card


def test_target_loads_and_generates(smoke_out):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = smoke_out / "mmspec-target"
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    img, qa, _ = sample_example(10**9 + 5, "count")
    text = proc.apply_chat_template(build_messages(qa.prompt), add_generation_prompt=True)
    assert text == format_prompt(qa.prompt)
    inputs = proc(images=img, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 196
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # text-only prompt (no image) works too
    t2 = proc.apply_chat_template(build_messages("Hello!", with_image=False), add_generation_prompt=True)
    inp2 = proc(text=t2, return_tensors="pt")
    assert model.generate(**inp2, max_new_tokens=3, do_sample=False).shape[1] > inp2["input_ids"].shape[1]


def test_drafters_load(smoke_out):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    AutoModelForImageTextToText.from_pretrained(smoke_out / "mmspec-draft-vlm")
    tok = AutoTokenizer.from_pretrained(smoke_out / "mmspec-draft-text")
    lm = AutoModelForCausalLM.from_pretrained(smoke_out / "mmspec-draft-text", dtype=torch.float32)
    text = tok.apply_chat_template(build_messages("Describe the image.", with_image=False), add_generation_prompt=True, tokenize=False)
    assert text == format_prompt("Describe the image.", with_image=False)
    ids = tok(text, return_tensors="pt")
    assert lm.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_fast_encoder_matches_processor(smoke_out):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(smoke_out / "mmspec-target")
    ids = train.token_ids(proc.tokenizer)
    assert (ids["unk"], ids["pad"], ids["bos"], ids["eos"], ids["image"]) == (0, 1, 2, 3, 4)
    enc = train.Encoder(proc.tokenizer.backend_tokenizer.to_str(), ids["image"])
    for seed in range(5):
        img, qa, _ = sample_example(seed)
        text = proc.apply_chat_template(build_messages(qa.prompt, qa.needs_image), add_generation_prompt=True)
        ref = proc(images=img if qa.needs_image else None, text=text, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == enc.prompt_ids(qa.prompt, qa.needs_image)
        full = proc.tokenizer(format_prompt(qa.prompt, False) + format_answer(qa.answer), add_special_tokens=True)["input_ids"]
        assert full == enc.prompt_ids(qa.prompt, False) + enc.answer_ids(qa.answer)
        assert full[-1] == ids["eos"]
        if qa.needs_image:
            pv = train.pixel_values(torch.from_numpy(__import__("numpy").array(img))[None], "cpu")
            assert torch.allclose(pv, ref["pixel_values"], atol=1e-5)


def test_world_eval_cli_runs(smoke_out, tmp_path):
    from mmspec import world_eval

    out = tmp_path / "we.json"
    res = world_eval.main(["--target", str(smoke_out / "mmspec-target"), "--n", "2", "--kinds", "count,color",
                           "--device", "cpu", "--json-out", str(out), "--update-card"])
    data = json.loads(out.read_text())
    assert set(data["per_kind"]) <= {"count", "color", "describe"} and data["per_kind"]
    assert 0.0 <= res["overall_accuracy"] <= 1.0
    card = (smoke_out / "mmspec-target" / "README.md").read_text()
    assert "| kind | n | accuracy |" in card and "Not measured yet" not in card


def test_continue_training(smoke_out, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(smoke_out / "mmspec-target", src / "mmspec-target")
    before = json.loads((src / "mmspec-target" / "train_log.json").read_text())
    train.main(["target", "--smoke", "--out", str(src), "--device", "cpu", "--steps-target", "5", "--quick-eval", "0",
                "--init-from", str(src / "mmspec-target"), "--seed", "1"])
    after = json.loads((src / "mmspec-target" / "train_log.json").read_text())
    assert after["info"]["steps"] == before["info"]["steps"] + 5
    assert len(after["info"]["runs"]) == 2
    assert after["train_loss"][-1][0] > before["info"]["steps"]  # global step numbers
