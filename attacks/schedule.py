"""Runs a task's attack schedule with APGD: one stage (``attack=apgd``) or RobustVLM's ensemble.

Per sample, the adversarial image with the lowest task score seen so far is kept, and a sample leaves the
schedule once its score is at or below the task's ``success_below`` (e.g. CIDEr < 10, VQA accuracy 0).
"""

from __future__ import annotations

import logging
import time

import torch

from attacks.apgd import APGD
from attacks.base import Objective, check_invariants

log = logging.getLogger(__name__)


class ScheduleAttack:
    def __init__(self, apgd: APGD):
        self.apgd = apgd

    @property
    def eps(self) -> float:
        return self.apgd.eps

    def __call__(self, objective: Objective, x: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        tic = time.perf_counter()
        x = x.detach().float()
        n = x.shape[0]
        everyone = torch.arange(n, device=x.device)
        with torch.no_grad():
            score = objective.score(x, everyone).float().clone()
        score_clean = score.clone()
        best = x.clone()
        kept = ["clean"] * n
        stages_run = [0] * n
        cut = objective.success_below
        active = torch.ones(n, dtype=torch.bool, device=x.device) if cut is None else score > cut
        for stage in objective.stages:
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            start = best[idx] if stage.start == "best" else x[idx]
            x_stage, _ = self.apgd.with_dtype(stage.dtype).perturb(stage.loss, x[idx], index=idx, x_init=start)
            with torch.no_grad():
                s = objective.score(x_stage, idx).float()
            better = s < score[idx]
            for j, i in enumerate(idx.tolist()):
                stages_run[i] += 1
                if better[j]:
                    best[i], score[i], kept[i] = x_stage[j], s[j], stage.name
            if cut is not None:
                active[idx] = score[idx] > cut
        checks = check_invariants(best, x, self.eps)
        seconds = (time.perf_counter() - tic) / n
        info = [{"stages_run": stages_run[i], "score_clean": float(score_clean[i]), "score_final": float(score[i]),
                 "kept_stage": kept[i], "seconds": seconds, **checks[i]} for i in range(n)]
        return best, info
