"""Task prompting: per-family templates, seeded text-only demonstrations recorded per sample, config errors
that name the key, and open_flamingo's answer post-processing."""

from __future__ import annotations

import pytest

from evaluators.datasets.vqa import VQAQuestions
from evaluators.errors import ConfigError
from evaluators.tasks.prompting import PromptTemplate
from evaluators.tasks.vqa import VQATask
from tests.test_tasks import FakeVLM, vqa_source  # noqa: F401 (fixture)


class _DemoSource(VQAQuestions):
    """A VQA source whose train pool is a fixed list (the loaders read theirs from the train split)."""

    pool = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)]

    def demonstrations(self) -> list[dict]:
        return list(self.pool)


def test_demonstrations_are_text_only_seeded_per_sample_and_recorded(vqa_source):  # noqa: F811
    src = object.__new__(_DemoSource)
    src.__dict__.update(vqa_source.__dict__)
    prompts = {"fake": {"user": "Question:{question} Short answer:", "demonstrations": 2}}
    task = VQATask(src, prompts=prompts, demo_seed=42)
    vlm = FakeVLM()
    batch = [src.get(i) for i in src.ids]
    first = task.build_prompts(vlm, batch)
    # same sample -> same prompt, whatever the batch around it; another seed -> other demonstrations
    assert task.build_prompts(vlm, batch[::-1]) == first[::-1]
    assert task.build_prompts(vlm, batch[1:2]) == first[1:2]
    other = VQATask(src, prompts=prompts, demo_seed=43).build_prompts(vlm, batch)
    assert other != first
    for p, s in zip(first, batch, strict=True):
        demos = p.split(" | ")
        assert len(demos) == 3 and demos[2] == f"<image>Question:{s['question']} Short answer:"
        for d in demos[:2]:  # text only, answered, from the pool
            assert not d.startswith("<image>")
            q, a = d.removeprefix("Question:").split(" Short answer:=")
            assert {"question": q, "answer": a} in _DemoSource.pool
        assert demos[0] != demos[1]
    assert len({p.rsplit(" | ", 1)[0] for p in first}) > 1  # each sample draws its own demonstrations
    assert task.inputs(batch[0])["prompt"] == first[0]


def test_prompt_config_errors_name_the_key(vqa_source):  # noqa: F811
    vlm = FakeVLM()
    batch = [vqa_source.get(vqa_source.ids[0])]
    with pytest.raises(ConfigError, match="no template for model family 'fake'"):
        VQATask(vqa_source, prompts={"llava": {"user": "{question}"}}).build_prompts(vlm, batch)
    with pytest.raises(ConfigError, match="uses 'caption'"):
        VQATask(vqa_source, prompts={"fake": {"user": "{caption}"}}).build_prompts(vlm, batch)
    with pytest.raises(ConfigError, match="unknown keys"):
        VQATask(vqa_source, prompts={"fake": {"user": "x", "beams": 3}})
    src = object.__new__(_DemoSource)
    src.__dict__.update(vqa_source.__dict__)
    with pytest.raises(ConfigError, match="11 demonstrations requested but the train pool has 10"):
        VQATask(src, prompts={"fake": {"user": "{question}", "demonstrations": 11}}).build_prompts(vlm, batch)


def test_open_flamingo_postprocessing():
    cap = PromptTemplate("Output:", cut_at=("Output",), remove=('"',))
    assert cap.postprocess(' a "dog" on grass Output: a cat') == "a dog on grass"
    vqa = PromptTemplate("Question:{question} Short answer:", cut_at=("Question", "Answer", "Short"), split_at=", ")
    assert vqa.postprocess(" yes, it is\nQuestion: why") == "yes"
    assert vqa.postprocess("two Short answer: three") == "two"
    assert PromptTemplate("x").postprocess("  as is, untouched ") == "as is, untouched"
