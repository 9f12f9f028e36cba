"""bench/rejections.py: what counts as a rejection, on hand-made steps, and one real run."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import rejections as rj  # noqa: E402
from mmspec.trace import DraftTree, StepRecord  # noqa: E402

EOS = 2


def step(tokens, parents, accepted, probs, next_text="T", texts=None):
    depths = []
    for p in parents:
        depths.append(1 if p == -1 else depths[p] + 1)
    texts = texts or [f"d{t}" for t in tokens]
    new = [tokens[i] for i in accepted] + [9]
    return StepRecord(index=0, kind="draft", tree=DraftTree(tokens, parents, depths, [0.5] * len(tokens)),
                      node_texts=texts, target_tokens=[0] * len(tokens), target_texts=[""] * len(tokens),
                      target_probs=probs, accepted=accepted, next_token=9, next_kind="correction",
                      next_text=next_text, new_tokens=new, new_texts=[texts[i] for i in accepted] + [next_text],
                      draft_ms=0, verify_ms=0, step_ms=0, elapsed_s=0)


def test_rejections_count_the_first_choice_after_the_accepted_path_and_not_past_the_end():
    chain = step([5, 6, 7], [-1, 0, 1], [0, 1], [0.9, 0.8, 0.4])  # depth 3 rejected, target p 0.4
    ended = step([5, EOS, 7], [-1, 0, 1], [0, 1], [0.9, 0.9, 0.01])  # eos accepted: the draft after it is moot
    tree = step([5, 6, 8], [-1, -1, 0], [], [0.3, 0.2, 0.9], next_text="X")  # both root children lost: first one counts
    full = step([5, 6], [-1, 0], [0, 1], [0.9, 0.9])  # every draft accepted: nothing rejected
    counts = rj.new_counts(max_contexts=5)
    rj.tally([chain, ended, tree, full], EOS, counts)
    out = rj.summary(counts)
    assert out["rejections"] == 2
    assert out["acceptance_by_depth"] == {1: 0.75, 2: 1.0, 3: 0.0}  # depth 1: 3 of 4 steps; depth 3: 0 of 1
    assert out["target_p_of_rejected_median"] == 0.35 and out["target_p_of_rejected_below_0.1"] == 0.0
    assert dict(out["top_pairs"]) == {"'d7' -> 'T'": 1, "'d5' -> 'X'": 1}
    assert out["contexts"][0] == "...d5d6[d7 -> T]"
    assert out["contexts"][1] == "...d5d6Td5d2T[d5 -> X]"  # the text committed before the step


def test_a_real_run_reports_every_drafter(tmp_path):
    rep = rj.main(["--drafters", "ngram,draft-vlm", "--n", "2", "--max-new-tokens", "24", "--tree", "chain:4",
                   "--device", "cpu", "--out", str(tmp_path / "r.json")])  # speed.py's name for mmspec-draft-vlm
    assert set(rep["drafters"]) == {"ngram", "draft-vlm"} and (tmp_path / "r.json").exists()
    for row in rep["drafters"].values():
        assert 1.0 <= row["tau"] <= 5.0
        assert all(0.0 <= a <= 1.0 for a in row["acceptance_by_depth"].values())


def test_an_unknown_drafter_is_one_line():
    with pytest.raises(SystemExit, match="^rejections: model path .*no-such-drafter does not exist$"):
        rj.main(["--drafters", "no-such-drafter", "--n", "1", "--device", "cpu"])
