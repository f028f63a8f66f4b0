"""BPDA+EOT through a purification defense (Athalye et al. 2018), with DiffPure's adaptive-attack verdict.

Forward: the VLM sees the purified image. Backward: the purifier's Jacobian is taken as the identity (BPDA),
so the gradient is the VLM loss gradient at the purified image. EOT: the loss and its gradient are averaged
over ``eot_iter`` independent purification draws at every step, one draw at a time (each draw's graph is
freed before the next is built). Draw d of step k for a sample with seed s uses the generator seeded with
derive_seed(s, "eot", k, d), so attacks are reproducible and a sample's noise does not depend on its batch.

Verdict (``verdict``):

- ``"any_iterate"`` (DiffPure, default): every iterate, the starting point included, is purified with
  ``verdict_draws`` fresh draws (derive_seed(s, "verdict", k, d)) and judged by the task's draw-averaged
  verdict (classification: logits averaged over the draws, broken when the argmax is wrong; captioning and
  VQA: the metric averaged over the draws, broken when it is at or below the task's success threshold). An
  image is broken if any iterate breaks it; the first breaking iterate is returned (``info["broken_at"]``),
  else the best-loss iterate.
- ``"final"``: no judging during the attack; the best-loss iterate is returned and the run's evaluation
  (``attack.eval_draws`` draws) is the verdict.

Differences from DiffPure: the optimiser is APGD (DiffPure: PGD with a fixed step of eps/4, 50 steps), the
EOT average is over the loss (DiffPure averages logits, the same gradient for a mean of per-draw losses of
a linear head only), and ``verdict_draws`` is configurable (DiffPure: EOT-averaged logits of many draws).
The attack runs one stage: the task's first objective stage.
"""

from __future__ import annotations

import logging

import torch

from attacks.apgd import APGD
from attacks.base import Attack, LossFn, Objective
from diffcap.base import Purifier
from diffcap.purifiers import bpda
from evaluators.seeding import derive_seed, generators

log = logging.getLogger(__name__)

VERDICTS = ("any_iterate", "final")


class BPDAEOT(Attack):
    adaptive = True

    def __init__(self, apgd: APGD, eot_iter: int = 15, verdict: str = "any_iterate", verdict_draws: int = 10):
        if eot_iter < 1:
            raise ValueError(f"attack.eot_iter must be >= 1, got {eot_iter}")
        if verdict not in VERDICTS:
            raise ValueError(f"attack.verdict must be one of {list(VERDICTS)}, got {verdict!r}")
        if verdict_draws < 1:
            raise ValueError(f"attack.verdict_draws must be >= 1, got {verdict_draws}")
        self.apgd, self.eot_iter = apgd, int(eot_iter)
        self.verdict, self.verdict_draws = verdict, int(verdict_draws)

    @property
    def eps(self) -> float:
        return self.apgd.eps

    def eot_loss(self, loss_fn: LossFn, purifier: Purifier, seeds: list[int]):
        """The loss APGD maximises, returned with its gradient: the mean over ``eot_iter`` purification draws
        of ``loss_fn`` at BPDA inputs (forward value purified, gradient identity)."""
        if purifier.randomized and self.eot_iter == 1:
            log.warning("randomized defense attacked with eot_iter=1: one purification draw per gradient "
                        "underestimates the attack (use eot_iter >= 10)")
        calls = [0]

        def loss(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            total = torch.zeros(x.shape[0], device=x.device)
            grad = torch.zeros_like(x, dtype=torch.float32)
            for d in range(self.eot_iter):
                gens = generators([derive_seed(seeds[i], "eot", calls[0], d) for i in index.tolist()], x.device)
                xd = x.detach().requires_grad_(True)
                value = loss_fn(bpda(purifier, xd, gens), index).float()
                (g,) = torch.autograd.grad(value.sum(), xd)
                total += value.detach()
                grad += g.float()
                del value, g, xd  # nothing of this draw's graph survives into the next
            calls[0] += 1
            return total / self.eot_iter, grad / self.eot_iter

        return loss

    def run(self, objective: Objective, x: torch.Tensor, seeds: list[int],
            defense: Purifier | None) -> tuple[torch.Tensor, list[dict]]:
        stage = objective.stages[0]
        if len(objective.stages) != 1 or stage.restarts != 1 or stage.follow_best is not None:
            raise ValueError(
                f"attack=bpda_eot runs one APGD stage; the objective has {len(objective.stages)} stage(s) "
                f"({stage.restarts} restart(s)): set attack.schedule=single and attack.zero_shot.attacks=[apgd-ce]")
        assert defense is not None  # Attack.__call__ checked it
        n = x.shape[0]
        broken = torch.zeros(n, dtype=torch.bool)
        broken_at = [None] * n
        x_broken = x.clone()
        observe = None
        if self.verdict == "any_iterate":
            if objective.success_below is None:
                raise ValueError("DiffPure's verdict needs the task's success threshold (objective.success_below)")

            def observe(k: int, xk: torch.Tensor, index: torch.Tensor) -> None:
                purified = []
                for d in range(self.verdict_draws):
                    gens = generators([derive_seed(seeds[i], "verdict", k, d) for i in index.tolist()], x.device)
                    with torch.no_grad():
                        purified.append(defense.purify(xk, gens)[0])
                with torch.no_grad():
                    value = objective.verdict(purified, index).float().cpu()
                new = (value <= objective.success_below) & ~broken[index.cpu()]
                for j in new.nonzero().flatten().tolist():
                    i = int(index[j])
                    broken[i], broken_at[i], x_broken[i] = True, k, xk[j]

        apgd = self.apgd.variant(dtype=stage.dtype)
        x_adv, loss = apgd.perturb(self.eot_loss(stage.loss, defense, seeds), x, observe=observe)
        x_adv = torch.where(broken.to(x.device).view(-1, 1, 1, 1), x_broken, x_adv)
        return x_adv, [{"eot_loss": float(loss[i]), "eot_iter": self.eot_iter, "verdict": self.verdict,
                        "broken": bool(broken[i]) if observe is not None else None, "broken_at": broken_at[i]}
                       for i in range(n)]
