"""Bad input gets an InputError with a clear message (and exit code 2 from the CLI), traces round-trip."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmspec import DecodeConfig, Generation, InputError, generate, load_drafter, load_target, load_trace, save_trace
from mmspec.tree import parse_tree_spec
from tiny_models import image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tgt(tiny_dir):
    return load_target(str(tiny_dir / "llava"))


def test_missing_and_unreadable_images(tgt, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        generate(tgt, None, tmp_path / "nope.png", "describe", DecodeConfig(max_new_tokens=2))
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a png")
    with pytest.raises(InputError, match="not a readable image"):
        generate(tgt, None, bad, "describe", DecodeConfig(max_new_tokens=2))


def test_huge_image_is_downscaled(tgt):
    from mmspec.load import MAX_IMAGE_SIDE, load_image

    big = image(0, size=64).resize((5000, 3000))
    small = load_image(big)
    assert max(small.size) == MAX_IMAGE_SIDE
    assert len(generate(tgt, None, big, "describe", DecodeConfig(max_new_tokens=2)).token_ids) == 2


def test_empty_prompt_and_bad_settings(tgt):
    with pytest.raises(InputError, match="prompt is empty"):
        generate(tgt, None, image(0), "   ", DecodeConfig(max_new_tokens=2))
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(tgt, None, image(0), "hi", DecodeConfig(max_new_tokens=0))
    with pytest.raises(InputError, match="top_p"):
        generate(tgt, None, image(0), "hi", DecodeConfig(top_p=0))
    for spec in ["chain:0", "tree:3", "dynamic:1,2", "static:[[1]]", "static:/no/such/file.json"]:
        with pytest.raises(InputError):
            parse_tree_spec(spec)


def test_unknown_and_incompatible_drafters(tgt, tiny_dir):
    with pytest.raises(InputError, match="unknown drafter"):
        load_drafter("medusa", tgt)
    with pytest.raises(InputError, match="tokenizer"):
        load_drafter(str(tiny_dir / "foreign-text"), tgt)
    with pytest.raises(InputError, match="does not exist"):
        load_drafter("./no/such/dir", tgt)


def test_unloadable_targets(tmp_path, tiny_dir):
    with pytest.raises(InputError, match="config.json"):
        load_target(str(tmp_path))
    with pytest.raises(InputError, match="text-only"):
        load_target(str(tiny_dir / "text-draft"))


def test_trace_round_trips_through_json(tgt, tiny_dir, tmp_path):
    gen = generate(tgt, load_drafter(str(tiny_dir / "llava-draft"), tgt), image(1), "describe the image.",
                   DecodeConfig(max_new_tokens=20, tree="dynamic:8,3,2"))
    path = tmp_path / "trace.json"
    save_trace(gen, path)
    back = load_trace(path)
    assert back == gen
    assert Generation.from_dict(json.loads(gen.to_json())) == gen
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(InputError, match="not an mmspec trace"):
        load_trace(tmp_path / "junk.json")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mmspec", "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_json_and_trace(tiny_dir, tmp_path):
    img = tmp_path / "img.png"
    image(2).save(img)
    trace = tmp_path / "t.json"
    r = _cli("--target", str(tiny_dir / "qwen2vl"), "--drafter", str(tiny_dir / "qwen2vl"), "--image", str(img),
             "--prompt", "describe the image.", "--max-new-tokens", "12", "--tree", "dynamic:6,3,2", "--json",
             "--trace", str(trace), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 12 and isinstance(out["text"], str)
    assert {"tau", "tokens_per_s", "wall_s", "steps"} <= set(out["stats"])
    assert load_trace(trace).token_ids == out["token_ids"]
    # The fast path (preallocated cache; CUDA graphs only on a GPU) gives the same tokens.
    fast = _cli("--target", str(tiny_dir / "qwen2vl"), "--drafter", str(tiny_dir / "qwen2vl"), "--image", str(img),
                "--prompt", "describe the image.", "--max-new-tokens", "12", "--tree", "dynamic:6,3,2", "--json",
                "--device", "cpu", "--fast-path", "on")
    assert fast.returncode == 0, fast.stderr
    assert json.loads(fast.stdout)["token_ids"] == out["token_ids"]


def test_cli_errors_are_one_line_messages(tiny_dir, tmp_path):
    r = _cli("--target", str(tiny_dir / "llava"), "--image", str(tmp_path / "missing.png"), "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error: image") and "Traceback" not in r.stderr
    img = tmp_path / "img.png"
    image(2).save(img)
    r = _cli("--target", str(tiny_dir / "llava"), "--drafter", str(tiny_dir / "foreign-text"), "--image", str(img), "--prompt", "hi")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
