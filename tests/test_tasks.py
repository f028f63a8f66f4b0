"""Tasks with a small fake VLM: predictions, per-sample and corpus metrics, and attack objectives."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluators.datasets.captions import KarpathyCaptions  # noqa: E402
from evaluators.datasets.imagefolder import ImageFolderClasses  # noqa: E402
from evaluators.datasets.vqa import VQAQuestions  # noqa: E402
from evaluators.errors import ConfigError  # noqa: E402
from evaluators.tasks.captioning import CaptioningTask, per_sample_loss  # noqa: E402
from evaluators.tasks.classification import ClassificationTask, targeted_dlr  # noqa: E402
from evaluators.tasks.vqa import VQATask, ranked_answers  # noqa: E402
from evaluators.vlms.base import VLM, Turn  # noqa: E402

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr's PTB tokenizer needs Java")

VOCAB = ["<unk>", "a", "red", "blue", "square", "circle", "on", "white", "black", "background", "yes", "no",
         "maybe", "word", "2", "3"]
RES = 8
CAPTION_PROMPTS = {"fake": {"user": "caption this", "decoding": {"max_new_tokens": 7}}}
VQA_PROMPTS = {"fake": {"user": "Q: {question} A:", "decoding": {"max_new_tokens": 3},
                        "postprocess": {"cut_at": ["Question"]}}}
TEMPLATES = ["a photo of a {}."]


class FakeVLM(VLM):
    """Deterministic outputs from pixel statistics; losses are token cross-entropies of logits that are
    linear in the pixels, so they are differentiable in x. Records every prompt and decoding setting."""

    resolution = RES
    family = "fake"
    capabilities = frozenset({"generate", "loss", "embed", "zero_shot"})

    def __init__(self, max_classes: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        d = 3 * RES * RES
        self.register_buffer("w_vocab", torch.randn(d, len(VOCAB), generator=g) * 4 / d**0.5)
        self.register_buffer("w_cls", torch.randn(d, max_classes, generator=g) * 4 / d**0.5)
        self.calls: list[tuple[str, list[str], dict]] = []

    def format_prompt(self, turns: Sequence[Turn]) -> str:
        return " | ".join(("<image>" if t.image else "") + t.user + (f"={t.assistant}" if t.assistant else "")
                          for t in turns)

    def generate(self, x: torch.Tensor, prompts: Sequence[str], **decoding) -> list[str]:
        assert len(prompts) == x.shape[0]
        self.calls.append(("generate", list(prompts), decoding))
        if all("caption" in p for p in prompts):
            return self.caption(x)
        return [a + " Question: more" for a in self.answer(x, prompts)]  # the template's cut_at drops the tail

    def loss(self, x: torch.Tensor, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        assert len(prompts) == len(targets) == x.shape[0]
        self.calls.append(("loss", list(prompts), {}))
        return self.token_ce(x, targets)

    def zero_shot_logits(self, x: torch.Tensor, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        assert list(templates) == TEMPLATES
        return self.classify(x, classnames)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.flatten(1) @ self.w_vocab, dim=1)

    def _redder(self, x: torch.Tensor) -> list[bool]:
        return (x[:, 0].mean((1, 2)) > x[:, 2].mean((1, 2))).tolist()

    def caption(self, x: torch.Tensor) -> list[str]:
        return ["a red square on a white background" if r else "a blue circle on a black background"
                for r in self._redder(x)]

    def answer(self, x: torch.Tensor, questions: Sequence[str]) -> list[str]:
        assert len(questions) == x.shape[0]
        return ["Yes." if r else "no" for r in self._redder(x)]

    def token_ce(self, x: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        logits = (x.flatten(1) - 0.5) @ self.w_vocab
        out = []
        for i, t in enumerate(texts):
            ids = torch.tensor([VOCAB.index(w) if w in VOCAB else 0 for w in t.lower().split()] or [0])
            out.append(F.cross_entropy(logits[i].expand(len(ids), -1), ids))
        return torch.stack(out)

    def classify(self, x: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        return 10 * (x.flatten(1) - 0.5) @ self.w_cls[:, : len(classnames)]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Alternately reddish and bluish images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, RES, RES, generator=g) * 0.2 + 0.4
    x[0::2, 0] += 0.3
    x[1::2, 2] += 0.3
    return x.clamp(0, 1)


def _check_stage_losses(objective, x: torch.Tensor) -> None:
    """Every stage: shape (len(index),) and a gradient w.r.t. x, on the full batch and on a subset."""
    for index in (torch.arange(x.shape[0]), torch.tensor([x.shape[0] - 1])):
        for stage in objective.stages:
            xi = x[index].clone().requires_grad_(True)
            fn = stage.loss if stage.follow_best is None else stage.follow_best([None] * x.shape[0])
            loss = fn(xi, index)
            assert loss.shape == (len(index),), stage.name
            assert torch.isfinite(loss).all(), stage.name
            (grad,) = torch.autograd.grad(loss.sum(), xi)
            assert grad.shape == xi.shape and torch.isfinite(grad).all()


def _dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------------------- captioning


@pytest.fixture
def caption_source(tmp_path) -> KarpathyCaptions:
    refs = {
        1: ["a red square on a white background", "red square on white", "a square that is red",
            "a red square", "a big red square on a white background"],
        2: ["a blue circle on a black background", "blue circle on black", "a circle that is blue",
            "a blue circle", "a small blue circle on a black background"],
        3: ["a red square", "a square", "red square"],  # only three references (and sentences)
    }
    images = [{"filepath": "images", "filename": f"img_{i}.png", "imgid": i, "cocoid": i, "split": "test",
               "sentences": [{"raw": r} for r in caps]} for i, caps in refs.items()]
    anns = [{"image_id": i, "caption": c} for i, caps in refs.items() for c in caps]
    (tmp_path / "images").mkdir()
    return KarpathyCaptions(_dump(tmp_path / "k.json", {"images": images}),
                            _dump(tmp_path / "c.json", {"annotations": anns}), tmp_path)


@needs_java
def test_captioning_predict_score_aggregate(caption_source):
    task = CaptioningTask(caption_source, prompts=CAPTION_PROMPTS)
    vlm = FakeVLM()
    batch = [caption_source.get(i) for i in caption_source.ids]
    with pytest.raises(RuntimeError, match="prepare"):
        task.score(["x"] * 3, batch)
    task.prepare(caption_source.ids)
    x = _images(3)
    preds = task.predict(vlm, x, batch)
    assert preds == ["a red square on a white background", "a blue circle on a black background",
                     "a red square on a white background"]
    assert vlm.calls == [("generate", ["<image>caption this"] * 3, {"max_new_tokens": 7})]
    scores = task.score(preds, batch)
    assert all(set(s) == {"cider"} for s in scores)
    assert scores[0]["cider"] > 100 and scores[1]["cider"] > 100
    wrong = task.score(list(reversed(preds[:2])), batch[:2])
    assert wrong[0]["cider"] < scores[0]["cider"] / 2
    agg = task.aggregate(dict(zip(caption_source.ids, preds, strict=True)), {s["id"]: s for s in batch})
    assert set(agg) == {"cider"}
    assert agg["cider"] == pytest.approx(sum(s["cider"] for s in scores) / 3)
    # fewer predictions than prepared: idf from those samples' references (a different number)
    sub = task.aggregate({"1": preds[0], "2": preds[1]}, {s["id"]: s for s in batch})
    assert sub["cider"] != pytest.approx((scores[0]["cider"] + scores[1]["cider"]) / 2)
    assert task.references(batch[0]) == {"captions": batch[0]["captions"]} and task.inputs(batch[0]) == {"prompt": "<image>caption this"}
    # re-scoring from records alone (no prepare, no data set): id + inputs + references is enough
    rescore = CaptioningTask(caption_source, prompts=CAPTION_PROMPTS)
    views = {s["id"]: {"id": s["id"], **task.inputs(s), **task.references(s)} for s in batch}
    assert rescore.aggregate(dict(zip(caption_source.ids, preds, strict=True)), views) == agg


@needs_java
def test_captioning_objectives(caption_source):
    task = CaptioningTask(caption_source, attack_success_below=2.0, prompts=CAPTION_PROMPTS)
    vlm = FakeVLM()
    batch = [caption_source.get(i) for i in caption_source.ids]
    task.prepare(caption_source.ids)
    x = _images(3)

    single = task.objective(vlm, batch, "single")
    assert [s.name for s in single.stages] == ["caption-0"]
    assert single.success_below == 2.0
    ens = task.objective(vlm, batch, "ensemble")
    assert [s.name for s in ens.stages] == [f"caption-{k}" for k in range(5)] + ["caption-best-fp32"]
    assert [s.dtype for s in ens.stages] == [None] * 5 + ["float32"]
    assert not any(s.targeted for s in ens.stages)
    _check_stage_losses(ens, x)
    # the fp32 stage attacks, per image, the caption whose stage did best (caption 0 while none did)
    final = ens.stages[-1]
    assert final.start == "best" and [s.target for s in ens.stages[:5]] == list(range(5))
    mixed = final.follow_best([2, None, 1])(x, torch.arange(3))
    caps = [batch[0]["sentences"][2], batch[1]["sentences"][0], batch[2]["sentences"][1]]
    assert torch.allclose(mixed, vlm.token_ce(x, caps))

    # stage k uses the k-th ground-truth caption of each sample
    idx = torch.arange(3)
    expected = vlm.token_ce(x, [b["sentences"][1] for b in batch])
    vlm.calls.clear()
    assert torch.allclose(ens.stages[1].loss(x, idx), expected)
    assert vlm.calls == [("loss", ["<image>caption this"] * 3, {})]
    # sample 3 has three captions: stages 3 and 4 leave it alone (loss 0, zero gradient)
    xi = x.clone().requires_grad_(True)
    loss = ens.stages[4].loss(xi, idx)
    assert loss[2] == 0 and loss[0] > 0
    (g,) = torch.autograd.grad(loss.sum(), xi)
    assert g[2].abs().sum() == 0 and g[0].abs().sum() > 0

    # the score is the per-sample CIDEr of the current caption, with the subset's idf
    s = ens.score(x[[1]], torch.tensor([1]))
    assert s.shape == (1,)
    assert float(s[0]) == pytest.approx(task.score([vlm.caption(x[[1]])[0]], [batch[1]])[0]["cider"])


def test_per_sample_loss_checks_shape():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        per_sample_loss(x, torch.arange(2), ["a", "b"], lambda xx, t: xx.sum())


# ------------------------------------------------------------------------------------------------ VQA


@pytest.fixture
def vqa_source(tmp_path) -> VQAQuestions:
    qs = [{"image_id": 1, "question": "Is it red?", "question_id": 10},
          {"image_id": 2, "question": "Is it red?", "question_id": 20},
          {"image_id": 3, "question": "How many?", "question_id": 30}]
    answers = {10: ["yes"] * 10, 20: ["no"] * 7 + ["No", "nope", "no"], 30: ["2"] * 2 + ["3"] * 8}
    anns = [{"question_id": q, "answer_type": "yes/no", "answers": [{"answer": a} for a in ans]}
            for q, ans in answers.items()]
    (tmp_path / "img").mkdir()
    return VQAQuestions(_dump(tmp_path / "q.json", {"questions": qs}), _dump(tmp_path / "a.json", {"annotations": anns}),
                        tmp_path / "img", "{image_id}.png")


def test_vqa_predict_score_aggregate(vqa_source):
    task = VQATask(vqa_source, prompts=VQA_PROMPTS)
    vlm = FakeVLM()
    batch = [vqa_source.get(i) for i in vqa_source.ids]
    x = _images(3)
    preds = task.predict(vlm, x, batch)
    assert preds == ["Yes.", "no", "Yes."]  # post-processed: cut at "Question"
    assert vlm.calls == [("generate", ["<image>Q: Is it red? A:", "<image>Q: Is it red? A:", "<image>Q: How many? A:"],
                          {"max_new_tokens": 3})]
    scores = [s["vqa_acc"] for s in task.score(preds, batch)]
    assert scores == pytest.approx([1.0, 1.0, 0.0])
    assert task.score(["2"], batch[2:])[0]["vqa_acc"] == pytest.approx(0.6)  # leave-one-out, 2 of 10
    agg = task.aggregate(dict(zip(vqa_source.ids, preds, strict=True)), {b["id"]: b for b in batch})
    assert agg == {"vqa_acc": pytest.approx(100 * 2 / 3)}
    # the official convention compares raw strings when the annotators agree
    official = VQATask(vqa_source, gt_normalisation="if_disagree", prompts=VQA_PROMPTS)
    assert official.score(["Yes."], batch[:1])[0]["vqa_acc"] == 0.0
    assert task.inputs(batch[0]) == {"question": "Is it red?", "prompt": "<image>Q: Is it red? A:"}
    assert task.references(batch[0]) == {"answers": ["yes"] * 10, "answer_type": "yes/no"}
    with pytest.raises(ValueError):
        VQATask(vqa_source, gt_normalisation="never")


def test_vqa_objectives(vqa_source):
    task = VQATask(vqa_source, prompts=VQA_PROMPTS)
    vlm = FakeVLM()
    batch = [vqa_source.get(i) for i in vqa_source.ids]
    x = _images(3)
    assert ranked_answers(batch[1]["answers"]) == ["no", "No", "nope"]

    single = task.objective(vlm, batch, "single")
    assert [s.name for s in single.stages] == ["answer-0"]
    idx = torch.arange(3)
    assert torch.allclose(single.stages[0].loss(x, idx), vlm.token_ce(x, ["yes", "no", "3"]))
    assert vlm.calls[-1] == ("loss", [f"<image>Q: {b['question']} A:" for b in batch], {})

    ens = task.objective(vlm, batch, "ensemble")
    names = [s.name for s in ens.stages]
    assert names == [f"answer-{k}" for k in range(5)] + ["answer-best-fp32", "target-maybe", "target-Word"]
    assert [s.targeted for s in ens.stages] == [False] * 6 + [True, True]
    assert ens.success_below == 0.0
    _check_stage_losses(ens, x)
    # answer-1: question 10 has one distinct answer (skipped), 20 -> "No", 30 -> "2"
    loss = ens.stages[1].loss(x, idx)
    assert loss[0] == 0
    assert torch.allclose(loss[1:], vlm.token_ce(x[1:], ["No", "2"]))
    # the fp32 stage attacks, per question, the answer whose stage did best
    best = ens.stages[5].follow_best([None, 1, 1])(x, idx)
    assert torch.allclose(best, vlm.token_ce(x, ["yes", "No", "2"]))

    # ascending a targeted stage makes the target answer more likely
    for stage, target in zip(ens.stages[-2:], ["maybe", "Word"], strict=True):
        xi = x.clone().requires_grad_(True)
        loss = stage.loss(xi, idx)
        assert torch.allclose(loss, -vlm.token_ce(x, [target] * 3))
        (g,) = torch.autograd.grad(loss.sum(), xi)
        x_up = (x + 2 / 255 * g.sign()).clamp(0, 1)
        assert (vlm.token_ce(x_up, [target] * 3) < vlm.token_ce(x, [target] * 3)).all()

    s = ens.score(x, idx)
    assert s.tolist() == pytest.approx([1.0, 1.0, 0.0])


# ------------------------------------------------------------------------------------- classification


def _class_source(tmp_path: Path, n_classes: int) -> ImageFolderClasses:
    root = tmp_path / f"cls{n_classes}"
    for c in range(n_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(d / "img.png")
    return ImageFolderClasses(root)


def test_classification_predict_score_aggregate(tmp_path):
    src = _class_source(tmp_path, 12)
    assert src.classnames[0] == "class 00"
    task = ClassificationTask(src, templates=TEMPLATES)
    vlm = FakeVLM()
    x = _images(4)
    logits = vlm.classify(x, src.classnames)
    batch = [{"id": f"s{i}", "image_path": "unused", "label": int(logits[i].argmax()) if i < 3 else
              (int(logits[i].argmax()) + 1) % 12} for i in range(4)]
    preds = task.predict(vlm, x, batch)
    assert preds == logits.argmax(1).tolist() and all(isinstance(p, int) for p in preds)
    assert [s["top1"] for s in task.score(preds, batch)] == [1.0, 1.0, 1.0, 0.0]
    agg = task.aggregate({b["id"]: p for b, p in zip(batch, preds, strict=True)}, {b["id"]: b for b in batch})
    assert agg == {"top1": pytest.approx(75.0)}
    assert task.references(batch[0]) == {"label": batch[0]["label"], "classname": src.classnames[batch[0]["label"]]}
    with pytest.raises(ConfigError, match="templates"):
        ClassificationTask(src)


def test_classification_objectives(tmp_path):
    src = _class_source(tmp_path, 12)
    task = ClassificationTask(src, templates=TEMPLATES)
    vlm = FakeVLM()
    x = _images(3, seed=1)
    clean = vlm.classify(x, src.classnames)
    labels = clean.argmax(1)
    batch = [{"id": str(i), "image_path": "unused", "label": int(labels[i])} for i in range(3)]
    idx = torch.arange(3)

    single = task.objective(vlm, batch, "single", protocol={"attacks": ["apgd-ce"]})
    assert [s.name for s in single.stages] == ["ce"]
    assert torch.allclose(single.stages[0].loss(x, idx), F.cross_entropy(clean, labels, reduction="none"))

    ens = task.objective(vlm, batch, "ensemble")
    assert [s.name for s in ens.stages] == ["ce"] + [f"dlr-target-{k}" for k in range(2, 11)]
    assert [s.targeted for s in ens.stages] == [False] + [True] * 9
    assert ens.score(x, idx).tolist() == [1.0, 1.0, 1.0]  # the first evaluation fixes the target ranking
    _check_stage_losses(ens, x)

    order = clean.argsort(1, descending=True)
    zs = clean.sort(1, descending=True).values
    for k, stage in enumerate(ens.stages[1:], start=1):
        t = order[:, k]
        # the documented formula, by hand
        hand = -(clean[idx, labels] - clean[idx, t]) / (zs[:, 0] - (zs[:, 2] + zs[:, 3]) / 2 + 1e-12)
        assert torch.allclose(stage.loss(x, idx), hand, atol=1e-6)
    targets = torch.stack([order[:, k] for k in range(1, 10)], 1)
    assert all(len(set(row.tolist())) == 9 and int(labels[i]) not in row.tolist() for i, row in enumerate(targets))

    # ascending the 2nd-class stage moves the logits towards the target
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ens.stages[1].loss(xi, idx).sum(), xi)
    z_up = vlm.classify((x + 4 / 255 * g.sign()).clamp(0, 1), src.classnames)
    t = order[:, 1]
    assert ((z_up[idx, t] - z_up[idx, labels]) > (clean[idx, t] - clean[idx, labels])).all()
    assert (F.cross_entropy(z_up, t, reduction="none") < F.cross_entropy(clean, t, reduction="none")).all()

    # rows seen first under a perturbation keep the ranking of x_clean when it is given
    ens2 = task.objective(vlm, batch, "ensemble", x_clean=x)
    shifted = (x + 0.01).clamp(0, 1)
    hand = targeted_dlr(vlm.classify(shifted, src.classnames), labels, order[:, 1])
    assert torch.allclose(ens2.stages[1].loss(shifted, idx), hand)


def test_classification_few_classes(tmp_path):
    src = _class_source(tmp_path, 3)
    task = ClassificationTask(src, templates=TEMPLATES)
    vlm = FakeVLM()
    x = _images(2)
    labels = vlm.classify(x, src.classnames).argmax(1)
    batch = [{"id": str(i), "image_path": "unused", "label": int(labels[i])} for i in range(2)]
    ens = task.objective(vlm, batch, "ensemble")
    assert [s.name for s in ens.stages] == ["ce", "dlr-target-2", "dlr-target-3"]
    _check_stage_losses(ens, x)

