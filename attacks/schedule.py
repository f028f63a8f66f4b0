"""Runs a task's attack schedule with APGD: one stage (``schedule=single``), RobustVLM's caption/VQA ensemble,
or the zero-shot classification protocol (AutoAttack's APGD-CE with restarts, then APGD-T per target class).

Per sample, the adversarial image with the lowest task score seen so far is kept, and a sample leaves the
schedule once its score is at or below the task's ``success_below`` (e.g. CIDEr < 10, VQA accuracy 0,
misclassified), as AutoAttack and RobustVLM attack only the points not yet broken. Each restart of a stage
draws its own random start (when the stage starts from the clean image and random start is on) from the
sample's seed, so a sample's attack does not depend on its batch.

Difference from AutoAttack: AutoAttack counts a point as broken when any iterate of a run misclassifies it;
here each run's best-loss iterate is scored (the same rule for every task, since scoring a caption or answer
at every iterate would mean generating text at every step).
"""

from __future__ import annotations

import logging

import torch

from attacks.apgd import APGD
from attacks.base import Attack, Objective, Stage
from diffcap.base import Purifier
from evaluators.seeding import derive_seed, generators

log = logging.getLogger(__name__)


class ScheduleAttack(Attack):
    """Grey-box: the attacker sees the VLM only; ``defense`` is ignored."""

    def __init__(self, apgd: APGD):
        self.apgd = apgd

    @property
    def eps(self) -> float:
        return self.apgd.eps

    def stage_attack(self, stage: Stage) -> APGD:
        return self.apgd.variant(dtype=stage.dtype, initial_step=stage.initial_step, random_start=stage.random_start)

    def run(self, objective: Objective, x: torch.Tensor, seeds: list[int],
            defense: Purifier | None) -> tuple[torch.Tensor, list[dict]]:
        n = x.shape[0]
        everyone = torch.arange(n, device=x.device)
        with torch.no_grad():
            score = objective.score(x, everyone).float().clone()
        score_clean = score.clone()
        best = x.clone()
        kept: list[str] = ["clean"] * n
        kept_target: list = [None] * n
        runs = [0] * n
        cut = objective.success_below
        active = torch.ones(n, dtype=torch.bool, device=x.device) if cut is None else score > cut
        for s_i, stage in enumerate(objective.stages):
            loss = stage.loss if stage.follow_best is None else stage.follow_best(list(kept_target))
            apgd = self.stage_attack(stage)
            for r in range(stage.restarts):
                idx = active.nonzero().flatten()
                if idx.numel() == 0:
                    break
                rows = idx.tolist()
                x_init = best[idx] if stage.start == "best" else None
                gens = generators([derive_seed(seeds[i], "start", s_i, r) for i in rows])
                x_stage, _ = apgd.perturb(loss, x[idx], index=idx, x_init=x_init, generators=gens)
                with torch.no_grad():
                    s = objective.score(x_stage, idx).float()
                better = s < score[idx]
                for j, i in enumerate(rows):
                    runs[i] += 1
                    if better[j]:
                        best[i], score[i], kept[i] = x_stage[j], s[j], stage.name
                        kept_target[i] = stage.target
                if cut is not None:
                    active[idx] = score[idx] > cut
        info = [{"runs": runs[i], "score_clean": float(score_clean[i]), "score_final": float(score[i]),
                 "kept_stage": kept[i]} for i in range(n)]
        return best, info
