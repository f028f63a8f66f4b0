"""BPDA+EOT through a purification defense (Athalye et al. 2018), as DiffPure evaluated itself.

Forward: the VLM sees the purified image. Backward: the purifier's Jacobian is taken as the identity (BPDA),
so the gradient is the VLM loss gradient at the purified image. EOT: the loss, and so its gradient, is
averaged over ``eot_iter`` independent purification draws at every step. Draw d of APGD's call c for a sample
with seed s uses the generator seeded with derive_seed(s, "eot", c, d), so attacks are reproducible and a
sample's noise does not depend on its batch.
"""

from __future__ import annotations

import logging
import time

import torch

from attacks.apgd import APGD
from attacks.base import Objective, check_invariants
from diffcap.base import Purifier
from diffcap.purifiers import bpda
from evaluators.seeding import derive_seed, generators

log = logging.getLogger(__name__)


class BPDAEOT:
    def __init__(self, apgd: APGD, eot_iter: int = 15):
        if eot_iter < 1:
            raise ValueError(f"attack.eot_iter must be >= 1, got {eot_iter}")
        self.apgd, self.eot_iter = apgd, int(eot_iter)

    @property
    def eps(self) -> float:
        return self.apgd.eps

    def eot_loss(self, objective: Objective, purifier: Purifier, seeds: list[int]):
        """The loss APGD maximises: mean over ``eot_iter`` purification draws of the first stage's loss at
        BPDA inputs (forward value purified, gradient identity)."""
        if purifier.randomized and self.eot_iter == 1:
            log.warning("randomized defense attacked with eot_iter=1: one purification draw per gradient "
                        "underestimates the attack (use eot_iter >= 10)")
        stage = objective.stages[0]
        calls = [0]

        def loss(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            total = 0.0
            for d in range(self.eot_iter):
                gens = generators([derive_seed(seeds[i], "eot", calls[0], d) for i in index.tolist()])
                total = total + stage.loss(bpda(purifier, x, gens), index)
            calls[0] += 1
            return total / self.eot_iter

        return loss

    def __call__(self, objective: Objective, x: torch.Tensor, purifier: Purifier,
                 sample_seeds: list[int]) -> tuple[torch.Tensor, list[dict]]:
        tic = time.perf_counter()
        x = x.detach().float()
        x_adv, loss = self.apgd.perturb(self.eot_loss(objective, purifier, sample_seeds), x)
        checks = check_invariants(x_adv, x, self.eps)
        seconds = (time.perf_counter() - tic) / x.shape[0]
        return x_adv, [{"eot_loss": float(loss[i]), "eot_iter": self.eot_iter, "seconds": seconds, **checks[i]}
                       for i in range(x.shape[0])]
