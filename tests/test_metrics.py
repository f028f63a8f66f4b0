"""Metrics checked against independent computations: pycocoevalcap called directly, and VQA accuracies
worked out by hand from the official evaluation's rules."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluators.metrics import cider as cider_mod  # noqa: E402
from evaluators.metrics.accuracy import top1, top1_correct  # noqa: E402
from evaluators.metrics.vqa_accuracy import (  # noqa: E402
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr's PTB tokenizer needs Java")

REFS = {
    "1": ["A man riding a horse on a beach.", "A person rides a brown horse near the sea.",
          "Man on horseback at the shore.", "a rider and his horse on the sand", "A horse with a rider by the ocean."],
    "2": ["Two cats sleeping on a red couch.", "A pair of cats asleep on a sofa.",
          "Cats napping on the couch.", "two kittens lying on a red sofa", "Sleeping cats on a couch."],
    "3": ["A plate of pasta with tomato sauce.", "Spaghetti with red sauce on a white plate.",
          "A dish of noodles and sauce.", "pasta on a plate", "A bowl of spaghetti with tomato sauce."],
    "4": ["A red double decker bus on a city street.", "A bus driving down the road.",
          "Red bus in the city.", "a double-decker bus parked on a street", "A London bus on a busy street."],
}
CANDS = {
    "1": "a man riding a horse on the beach",
    "2": "two cats sleeping on a couch",
    "3": "a laptop on a wooden desk",
    "4": "a red bus on a street",
}


def _pycoco(refs: dict[str, list[str]], cands: dict[str, str]) -> tuple[float, list[float]]:
    """The reference computation: pycocoevalcap exactly as COCOEvalCap runs it."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": cands[k]}] for k in refs})
    score, scores = Cider().compute_score(gts, res)
    return float(score) * 100, [float(s) * 100 for s in scores]


# ----------------------------------------------------------------------------------------------- CIDEr


@needs_java
def test_cider_matches_pycocoevalcap_exactly():
    scorer = cider_mod.CiderScorer(REFS)
    corpus_ref, per_ref = _pycoco(REFS, CANDS)
    per = scorer.score(CANDS)
    assert list(per) == list(CANDS)
    assert [per[k] for k in REFS] == per_ref  # bit-exact: same code path, same order
    assert scorer.corpus(CANDS) == corpus_ref
    # sanity of the values themselves
    assert per["1"] > 100 and per["2"] > 50
    assert per["3"] < 10  # unrelated caption ("a" and "on a" are shared, little else)


@needs_java
def test_cider_identical_high_unrelated_zero():
    scorer = cider_mod.CiderScorer(REFS)
    same = scorer.score({"2": REFS["2"][0]})["2"]
    unrelated = scorer.score({"2": "zebra giraffe xylophone"})["2"]
    assert same > 100
    assert unrelated == 0.0
    # punctuation and case do not matter after PTB tokenisation
    assert scorer.score({"2": "two CATS, sleeping on a red couch!"})["2"] == pytest.approx(same)


@needs_java
def test_cider_subset_uses_corpus_idf():
    scorer = cider_mod.CiderScorer(REFS)
    full = scorer.score(CANDS)
    sub = scorer.score({"2": CANDS["2"], "4": CANDS["4"]})
    assert sub == {"2": full["2"], "4": full["4"]}
    # pycocoevalcap on the one image alone has idf 0 everywhere, so it scores 0: the subset score above
    # really uses the idf of the whole evaluated set
    alone, _ = _pycoco({"2": REFS["2"]}, {"2": CANDS["2"]})
    assert alone == 0.0 and sub["2"] > 0
    # the corpus of a subset is the mean of its per-sample values under the full idf
    assert scorer.corpus({"2": CANDS["2"], "4": CANDS["4"]}) == pytest.approx((full["2"] + full["4"]) / 2)


@needs_java
def test_cider_rejects_unknown_ids_and_empty_candidates():
    scorer = cider_mod.CiderScorer(REFS)
    with pytest.raises(KeyError, match="no references"):
        scorer.score({"99": "a cat"})
    assert scorer.score({"1": ""})["1"] == 0.0
    with pytest.raises(ValueError):
        cider_mod.CiderScorer({"1": []})


def test_java_missing_gives_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(cider_mod.JavaNotFoundError) as err:
        cider_mod.check_java()
    msg = str(err.value)
    assert "Java not found" in msg and "default-jre-headless" in msg and "\n" not in msg
    with pytest.raises(cider_mod.JavaNotFoundError):
        cider_mod.CiderScorer(REFS)


def test_java_missing_via_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(cider_mod.JavaNotFoundError, match="install a JRE"):
        cider_mod.check_java()


# ------------------------------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize(
    ("pred", "answers", "expected"),
    [
        ("Two", ["2"] * 10, 1.0),  # number word -> digit, case
        ("a dog.", ["dog"] * 10, 1.0),  # article and trailing period
        ("yes.", ["yes"] * 10, 1.0),
        ("dont", ["don't"] * 10, 1.0),  # contraction restored
        ("1,000", ["1000"] * 10, 1.0),  # comma between digits removed
        ("the red car", ["red car"] * 10, 1.0),
        ("red, white", ["red white"] * 10, 1.0),  # ", " touches a space: deleted
        ("red,white", ["red white"] * 10, 1.0),  # no space: replaced by a space
        ("3.5", ["3.5"] * 10, 1.0),  # a period before a digit stays
        ("no", ["yes"] * 10, 0.0),
    ],
)
def test_vqa_accuracy_hand_cases(pred, answers, expected):
    assert vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_vqa_leave_one_out_by_hand():
    answers = ["2", "2"] + ["3"] * 8
    # leaving out one of the two "2"s (2 subsets): 1 match -> 1/3; leaving out a "3" (8 subsets): 2 -> 2/3
    expected = (8 * (2 / 3) + 2 * (1 / 3)) / 10
    assert expected == pytest.approx(0.6)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    # 3 matches: 7 subsets keep all 3 (-> 1), 3 subsets keep 2 (-> 2/3)
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((7 * 1 + 3 * (2 / 3)) / 10)
    # 4 or more matches: every subset has >= 3
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    # 1 match: 9 subsets with 1 -> 1/3
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)


def test_vqa_gt_normalisation_variants():
    # all annotators agree on "Two": the official script compares the raw strings
    assert vqa_accuracy("Two", ["Two"] * 10, gt_normalisation="always") == 1.0
    assert vqa_accuracy("two", ["Two"] * 10, gt_normalisation="always") == 1.0
    assert vqa_accuracy("two", ["Two"] * 10, gt_normalisation="if_disagree") == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10, gt_normalisation="if_disagree") == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10, gt_normalisation="if_disagree") == 1.0
    # annotators disagree: both sides are normalised, as under "always"
    answers = ["two"] * 9 + ["2"]
    assert vqa_accuracy("Two.", answers, gt_normalisation="if_disagree") == pytest.approx(1.0)
    assert vqa_accuracy("Two.", answers, gt_normalisation="always") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gt_normalisation"):
        vqa_accuracy("x", ["x"] * 10, gt_normalisation="sometimes")
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_normalisation_pieces():
    assert process_punctuation("what?") == "what "
    assert process_punctuation("what ?") == "what "
    assert process_punctuation("1,000!") == "1000"
    assert normalize_answer("  An Apple\tpie \n") == "apple pie"
    assert normalize_answer("None") == "0"
    assert normalize_answer("isnt it") == "isn't it"
    assert normalize_answer("couldnt've") == "couldn't've"
    assert normalize_answer("twas") == "'twas"
    assert normalize_answer("e.g. this.") == "eg this"


# ------------------------------------------------------------------------------------------------ top-1


def test_top1():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([1, 2, 2])
    assert top1_correct(logits, labels).tolist() == [1.0, 0.0, 1.0]
    assert top1([1, 0, 2], [1, 2, 2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        top1([1], [1, 2])
    with pytest.raises(ValueError):
        top1_correct(logits, labels[:2])
