"""Image captioning scored with CIDEr (x100), attacked as in RobustVLM (Schlarmann and Hein 2023).

The CIDEr idf comes from the references of the evaluated subset (``prepare``), so the per-sample values
recorded for a run, the per-sample values the attack uses to decide when an image is broken, and the
corpus number all share one idf and the corpus equals pycocoevalcap on the same subset.

Attack schedules (``objective``):

- ``"single"``: one stage, maximise the caption cross-entropy of the first ground-truth caption;
- ``"ensemble"``: one stage per ground-truth caption (the first five) in turn, then one more stage in
  float32 that starts from the best adversarial image so far and attacks, per image, the caption whose
  stage did best (the first caption while no stage improved on the clean image), as RobustVLM does. RobustVLM
  runs the five caption stages in float16 (``attack.precision``).

The attack stops on an image once its CIDEr is <= ``attack_success_below`` (RobustVLM: < 10 on COCO, < 2
on Flickr30k).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from attacks.base import Objective, Stage
from evaluators.datasets.base import SampleSource
from evaluators.metrics.cider import CiderScorer
from evaluators.tasks.base import Task
from evaluators.tasks.prompting import PromptTemplate
from evaluators.vlms.base import VLM, Turn, VLMAdapter

log = logging.getLogger(__name__)

T = TypeVar("T")

#: how many ground-truth captions the ensemble schedule attacks with, one stage each (RobustVLM: 5)
N_ENSEMBLE_CAPTIONS = 5


def per_sample_loss(
    x: torch.Tensor,
    index: torch.Tensor,
    targets: Sequence[T | None],
    fn: Callable[[torch.Tensor, list[T]], torch.Tensor],
) -> torch.Tensor:
    """``fn(x_rows, targets_of_rows)`` for the rows listed in ``index``; rows whose target is None (e.g. an
    image with fewer captions than the stage needs) get loss 0 with a zero gradient, which leaves them
    where they are, as RobustVLM skips such samples."""
    rows = [int(r) for r in index.tolist()]
    chosen = [targets[r] for r in rows]
    keep = [j for j, t in enumerate(chosen) if t is not None]
    if len(keep) == len(rows):
        out = fn(x, chosen)  # type: ignore[arg-type]
    else:
        zero = x.flatten(1).sum(1) * 0.0  # (n,), connected to x so backward works for every row
        if not keep:
            return zero.float()
        vals = fn(x[keep], [chosen[j] for j in keep])  # type: ignore[misc]
        keep_t = torch.tensor(keep, device=vals.device)
        out = zero.to(device=vals.device, dtype=vals.dtype).index_put((keep_t,), vals)
    if out.shape != (len(rows),):
        raise ValueError(f"a per-sample loss must have shape ({len(rows)},), got {tuple(out.shape)}")
    return out


def _rows(index: torch.Tensor) -> list[int]:
    return [int(r) for r in index.tolist()]


class CaptioningTask(Task):
    """COCO / Flickr30k (Karpathy test) captioning; the headline metric is corpus CIDEr x100."""

    name = "captioning"
    primary = "cider"

    def __init__(self, source: SampleSource, attack_success_below: float = 10.0,
                 prompts: Mapping[str, Any] | None = None, demo_seed: int = 0):
        super().__init__(source, prompts, demo_seed)
        self.attack_success_below = float(attack_success_below)
        self._scorer: CiderScorer | None = None
        # the scorer of the last aggregate() over another id set (re-scoring calls it once per condition)
        self._agg_cache: tuple[tuple[str, ...], CiderScorer] | None = None

    # ------------------------------------------------------------------------------------ references

    def _refs(self, sample: dict[str, Any]) -> list[str]:
        return list(sample["captions"])

    @staticmethod
    def attack_captions(sample: dict[str, Any]) -> list[str]:
        """The ground-truth captions the attack uses in turn: the Karpathy sentences when the loader gives
        them (RobustVLM's choice), else the references."""
        return list(sample.get("sentences") or sample["captions"])

    def prepare(self, ids: list[str]) -> None:
        """Tokenise the evaluated subset's references once; their idf is used for every CIDEr value."""
        if not ids:
            raise ValueError("prepare() needs the evaluated sample ids")
        refs = {i: self._refs(self.source.get(i)) for i in ids}
        self._scorer = CiderScorer(refs)
        log.info("CIDEr idf from the references of %d samples", len(refs))

    @property
    def scorer(self) -> CiderScorer:
        if self._scorer is None:
            raise RuntimeError("CaptioningTask.prepare(ids) must be called with the evaluated subset first "
                               "(CIDEr takes its idf from that subset's references)")
        return self._scorer

    def _cider(self, ids: Sequence[str], captions: Sequence[str]) -> list[float]:
        if len(ids) != len(captions):
            raise ValueError(f"{len(captions)} captions for {len(ids)} samples")
        values: list[float] = [0.0] * len(ids)
        # one PTB-tokenizer call per distinct id set (an id may appear twice in a batch)
        pending = list(range(len(ids)))
        while pending:
            seen: dict[str, int] = {}
            rest = []
            for j in pending:
                if ids[j] in seen:
                    rest.append(j)
                else:
                    seen[ids[j]] = j
            got = self.scorer.score({i: str(captions[j]) for i, j in seen.items()})
            for i, j in seen.items():
                values[j] = got[i]
            pending = rest
        return values

    # ------------------------------------------------------------------------------------ Task API

    def predict(self, vlm: VLM, x: torch.Tensor, batch: list[dict[str, Any]]) -> list[str]:
        return self.generate(vlm, x, batch)

    def demo_turn(self, template: PromptTemplate, demo: dict[str, Any]) -> Turn:
        return Turn(user=self._user_text(template, {}), assistant=str(demo["caption"]), image=False)

    def score(self, predictions: list[Any], batch: list[dict[str, Any]]) -> list[dict[str, float]]:
        values = self._cider([s["id"] for s in batch], predictions)
        return [{"cider": v} for v in values]

    def aggregate(self, predictions: dict[str, Any], samples: dict[str, dict[str, Any]]) -> dict[str, float]:
        """Corpus CIDEr x100 of the predictions. When they cover exactly the prepared subset, its scorer is
        used; otherwise (e.g. some images failed to load) the idf comes from the predicted samples'
        references, which is what pycocoevalcap would compute on them."""
        if not predictions:
            raise ValueError("no predictions to aggregate")
        ids = list(predictions)
        if self._scorer is not None and set(ids) == set(self._scorer.ids):
            scorer = self._scorer
        elif self._agg_cache is not None and self._agg_cache[0] == tuple(sorted(ids)):
            scorer = self._agg_cache[1]
        else:
            refs = {}
            for i in ids:
                sample = samples.get(i)
                refs[i] = self._refs(sample if sample is not None and "captions" in sample else self.source.get(i))
            log.info("corpus CIDEr over %d predicted samples (not the prepared subset): idf from their references",
                     len(ids))
            scorer = CiderScorer(refs)
            self._agg_cache = (tuple(sorted(ids)), scorer)
        return {"cider": scorer.corpus({i: str(p) for i, p in predictions.items()})}

    def objective(self, vlm: VLMAdapter, batch: list[dict[str, Any]], schedule: str,
                  x_clean: torch.Tensor | None = None, protocol: dict[str, Any] | None = None) -> Objective:
        if schedule not in ("single", "ensemble"):
            raise ValueError(f"schedule must be 'single' or 'ensemble', got {schedule!r}")
        captions = [self.attack_captions(s) for s in batch]
        prompts = self.build_prompts(vlm, batch)
        ids = [s["id"] for s in batch]
        _ = self.scorer  # fail now, not inside the attack, when prepare() was not called

        def caption_loss(k: int | list[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            """Loss of caption k, or of caption k[r] for batch row r."""
            ks = k if isinstance(k, list) else [k] * len(captions)
            targets = [(p, c[j]) if j < len(c) else None for p, c, j in zip(prompts, captions, ks, strict=True)]

            def loss(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
                return per_sample_loss(x, index, targets, lambda x_, pt: self.target_loss(vlm, x_, pt))

            return loss

        if schedule == "single":
            stages = [Stage("caption-0", caption_loss(0))]
        else:
            stages = [Stage(f"caption-{k}", caption_loss(k), target=k) for k in range(N_ENSEMBLE_CAPTIONS)]
            stages.append(Stage("caption-best-fp32", dtype="float32", start="best",
                                follow_best=lambda best: caption_loss([0 if k is None else k for k in best])))

        def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            rows = _rows(index)
            preds = self.generate(vlm, x, [batch[r] for r in rows])
            values = self._cider([ids[r] for r in rows], preds)
            return torch.tensor(values, dtype=torch.float32, device=x.device)

        return Objective(stages=stages, score=score, success_below=self.attack_success_below,
                         extra={"schedule": schedule, "metric": "cider"})

    def references(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``{"captions": [...]}``: with ``id`` and ``inputs`` this rebuilds what ``aggregate`` reads."""
        return {"captions": self._refs(sample)}
