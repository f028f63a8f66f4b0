"""Per-family prompt templates of a task (config ``dataset.tasks.<task>.prompts.<family>``), the few-shot
demonstrations they ask for, and the post-processing of generated answers.

A task holds one template per model family; the model only frames the turns it is given
(``VLM.format_prompt``), so a new task does not touch the models and a new model does not touch the tasks.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evaluators.errors import ConfigError
from evaluators.seeding import derive_seed

_KEYS = {"user", "demonstrations", "decoding", "postprocess"}
_POST_KEYS = {"cut_at", "split_at", "remove"}


@dataclass(frozen=True)
class PromptTemplate:
    """One family's template: ``user`` (a ``str.format`` pattern over the sample's fields, e.g.
    ``{question}``), the number of text-only demonstrations, decoding settings and answer post-processing."""

    user: str
    demonstrations: int = 0
    decoding: dict[str, Any] = field(default_factory=dict)
    cut_at: tuple[str, ...] = ()
    split_at: str | None = None
    remove: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, node: Mapping[str, Any], where: str) -> PromptTemplate:
        unknown = set(node) - _KEYS
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        if not isinstance(node.get("user"), str):
            raise ConfigError(f"{where}.user must be a string (the instruction or template)")
        post = dict(node.get("postprocess") or {})
        if set(post) - _POST_KEYS:
            raise ConfigError(f"{where}.postprocess has unknown keys {sorted(set(post) - _POST_KEYS)}")
        n_demos = int(node.get("demonstrations") or 0)
        if n_demos < 0:
            raise ConfigError(f"{where}.demonstrations must be >= 0, got {n_demos}")
        return cls(user=node["user"], demonstrations=n_demos, decoding=dict(node.get("decoding") or {}),
                   cut_at=tuple(post.get("cut_at") or ()), split_at=post.get("split_at"),
                   remove=tuple(post.get("remove") or ()))

    def postprocess(self, text: str) -> str:
        """This family's clean-up of a generated answer (``postprocess`` with the template's settings)."""
        return postprocess(text, self.cut_at, self.split_at, self.remove)


def postprocess(text: str, cut_at: Sequence[str] = (), split_at: str | None = None, remove: Sequence[str] = ()) -> str:
    """Keep the text before the first of ``cut_at`` (open_flamingo's model runs on into a new "Output:" or
    "Question:" chunk), then before the first ``split_at``, drop every ``remove`` string, strip whitespace
    (open_flamingo's answer clean-up; with no settings only the strip)."""
    if cut_at:
        text = re.split("|".join(re.escape(c) for c in cut_at), text, maxsplit=1)[0]
    if split_at:
        text = text.split(split_at, 1)[0]
    for r in remove:
        text = text.replace(r, "")
    return text.strip()


class TaskPrompts:
    """The templates of one task keyed by model family, and the seeded choice of demonstrations."""

    def __init__(self, task: str, prompts: Mapping[str, Any] | None, demo_seed: int = 0):
        self.task = task
        self.demo_seed = int(demo_seed)
        self.templates = {str(fam): PromptTemplate.from_config(dict(node), f"dataset.tasks.{task}.prompts.{fam}")
                          for fam, node in (prompts or {}).items()}

    def template(self, family: str) -> PromptTemplate:
        if family not in self.templates:
            raise ConfigError(f"dataset.tasks.{self.task}.prompts has no template for model family '{family}' "
                              f"(it has {sorted(self.templates)}); add one to the task's prompts config")
        return self.templates[family]

    def pick_demonstrations(self, pool: Sequence[dict[str, Any]], sample_id: str, n: int) -> list[dict[str, Any]]:
        """``n`` distinct demonstrations from ``pool``, drawn with a seed of (demo_seed, task, sample id): the
        same sample gets the same prompt in every batch layout and after a resume."""
        if n == 0:
            return []
        if len(pool) < n:
            raise ConfigError(f"{self.task}: {n} demonstrations requested but the train pool has {len(pool)}")
        rng = random.Random(derive_seed(self.demo_seed, self.task, sample_id, "demos"))
        return [pool[i] for i in rng.sample(range(len(pool)), n)]
