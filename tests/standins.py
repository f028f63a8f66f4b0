"""Tiny stand-ins for the denoiser (and its interface) shared by the sampler and purifier tests."""

from __future__ import annotations

import torch
from torch import nn

from diffcap.schedule import LINEAR


class TinyDenoiser(nn.Module):
    """A fixed random conv net eps(x, t): stands in for the real denoiser's interface."""

    def __init__(self, resolution: int = 16, seed: int = 0):
        super().__init__()
        self.resolution = resolution
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.c1 = nn.Conv2d(4, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.view(-1, 1, 1, 1).to(x).expand(-1, 1, *x.shape[-2:])
        return self.c2(torch.tanh(self.c1(torch.cat([x, tt], 1))))


class GaussianDenoiser(nn.Module):
    """Exact eps for data ~ N(m, s^2) per pixel (a perfect score model).

    ``forward(x, t)`` is exact for the continuous abar(t); ``predict(x, i)`` for guided-diffusion's index i
    (abar = alphas_cumprod[i]), as a network trained on the discrete steps is.
    """

    def __init__(self, m: float, s: float, resolution: int = 16):
        super().__init__()
        self.m, self.s, self.resolution = m, s, resolution

    def _eps(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        a = a.to(x).view(-1, 1, 1, 1)
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.m) / (a * self.s**2 + 1 - a)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._eps(x, LINEAR.alpha_bar(t))

    def predict(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self._eps(x, LINEAR.alphas_cumprod[i.cpu()]), None


class Counting(nn.Module):
    """Wraps a denoiser and records (batch size, t) of every call (t = i / N for index calls)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.resolution, self.calls = inner, inner.resolution, []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], t.detach().cpu().double().clone()))
        return self.inner(x, t)

    def predict(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hasattr(self.inner, "predict"):
            self.calls.append((x.shape[0], i.detach().cpu().double() / LINEAR.num_steps))
            return self.inner.predict(x, i)
        return self(x, i.double() / LINEAR.num_steps), None

    @property
    def rows(self) -> int:
        return sum(n for n, _ in self.calls)


def gens(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + offset + i) for i in range(n)]
