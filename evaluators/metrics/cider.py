"""CIDEr-D as pycocoevalcap computes it, with the idf fixed to one evaluated reference set.

Why a wrapper: pycocoevalcap's ``Cider.compute_score`` takes the document frequencies (idf) from the
references of exactly the images it is given. CIDEr is therefore not a per-image quantity: scoring one
image alone gives it an idf of log(1) - log(1) = 0 and a score of 0. The harness needs per-sample CIDEr
(to record it and, in the attack, to stop once an image is broken) that is consistent with the corpus
number of the whole evaluated subset. ``CiderScorer`` tokenises the subset's references once, keeps their
document frequencies and the log of their count (pycocoevalcap's ``ref_len``), and scores any subset of
candidates against them, reusing pycocoevalcap's own n-gram counting and similarity code. Scoring all ids
reproduces ``Cider().compute_score`` on the full set exactly.

Both the references and the candidates go through pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP's
PTB tokenizer, run with Java, lower-casing and dropping punctuation), as COCOEvalCap does. Each call of
``score``/``corpus`` tokenises all its candidates in one Java process.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer as _CocoCiderScorer
from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from evaluators.errors import JavaNotFoundError  # noqa: F401 (re-exported: defined with the other errors)

log = logging.getLogger(__name__)

JAVA_MISSING = (
    "Java not found: install a JRE (e.g. apt-get install default-jre-headless); "
    "pycocoevalcap's PTB tokenizer needs it"
)




_JAVA_OK: set[str] = set()


def check_java() -> None:
    """Fail early, with a one-line fix, instead of a FileNotFoundError (or a broken pipe, for a ``java`` that
    does not run) deep inside pycocoevalcap. A working ``java`` is remembered by its path."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(JAVA_MISSING)
    if java in _JAVA_OK:
        return
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
        ok, why = proc.returncode == 0, f"exit status {proc.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        ok, why = False, str(e)
    if not ok:
        raise JavaNotFoundError(f"{java} does not run ({why}); install a working JRE "
                                "(e.g. apt-get install default-jre-headless); pycocoevalcap's PTB tokenizer needs it")
    _JAVA_OK.add(java)


def ptb_tokenize(texts: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """PTB-tokenise lists of sentences keyed by id in one Java call (empty strings stay empty)."""
    check_java()
    if not texts:
        return {}
    payload = {k: [{"caption": str(s)} for s in v] for k, v in texts.items()}
    out = PTBTokenizer().tokenize(payload)
    return {k: list(out.get(k, [])) for k in texts}


class _DocFreq(dict):
    """Document frequencies that read 0 for unseen n-grams without storing them (pycocoevalcap's
    defaultdict would grow with every candidate n-gram ever scored)."""

    def __missing__(self, key: tuple[str, ...]) -> float:
        return 0.0


class _FixedIdfScorer(_CocoCiderScorer):
    """pycocoevalcap's scorer with the idf and ``ref_len`` of a larger reference set.

    ``compute_cider`` sets ``self.ref_len = log(len(self.crefs))``; the property below ignores that
    assignment so a subset is scored with the whole evaluated set's ``ref_len``.
    """

    def __init__(self, n: int, sigma: float, document_frequency: _DocFreq, ref_len: float):
        self._fixed_ref_len = ref_len
        super().__init__(n=n, sigma=sigma)
        self.document_frequency = document_frequency

    @property
    def ref_len(self) -> float:  # type: ignore[override]
        return self._fixed_ref_len

    @ref_len.setter
    def ref_len(self, value: float | None) -> None:
        # keep the whole reference set's value; pycocoevalcap would recompute it from the subset
        pass


class CiderScorer:
    """CIDEr-D (n=4, sigma=6 by default) with document frequencies from ``references``.

    ``references`` maps sample id -> reference captions (raw strings); it should be the WHOLE evaluated
    subset, since its size and n-gram statistics define the idf. Scores are on the x100 scale.
    """

    def __init__(self, references: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0):
        check_java()
        if not references:
            raise ValueError("CiderScorer needs at least one sample's references")
        for key, refs in references.items():
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"sample {key!r}: references must be a non-empty list of strings")
        self.n = n
        self.sigma = sigma
        self.ids: list[str] = list(references)
        tokenized = ptb_tokenize(references)
        self._crefs = {k: cook_refs(tokenized[k], n) for k in self.ids}
        counter = _CocoCiderScorer(n=n, sigma=sigma)
        counter.crefs = [self._crefs[k] for k in self.ids]
        counter.ctest = [None] * len(self.ids)
        counter.compute_doc_freq()
        self._df = _DocFreq(counter.document_frequency)
        self._ref_len = float(np.log(float(len(self.ids))))
        log.debug("CIDEr idf from %d samples (%d n-grams)", len(self.ids), len(self._df))

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._crefs

    def _raw_scores(self, candidates: Mapping[str, str]) -> tuple[list[str], np.ndarray]:
        """Per-sample CIDEr (pycocoevalcap's scale, x1) in the references' order."""
        unknown = [k for k in candidates if k not in self._crefs]
        if unknown:
            raise KeyError(
                f"{len(unknown)} candidate id(s) have no references in this scorer (e.g. {unknown[0]!r}); "
                "build the CiderScorer over the evaluated subset that contains them"
            )
        order = [k for k in self.ids if k in candidates]
        if not order:
            return [], np.zeros(0)
        tokenized = ptb_tokenize({k: [candidates[k]] for k in order})
        scorer = _FixedIdfScorer(self.n, self.sigma, self._df, self._ref_len)
        scorer.crefs = [self._crefs[k] for k in order]
        scorer.ctest = [cook_test(tokenized[k][0], self.n) for k in order]
        return order, np.array(scorer.compute_cider())

    def score(self, candidates: Mapping[str, str]) -> dict[str, float]:
        """Per-sample CIDEr x100 of each candidate (one caption per id), with this scorer's idf."""
        order, vals = self._raw_scores(candidates)
        by_id = {k: float(v) * 100.0 for k, v in zip(order, vals, strict=True)}
        return {k: by_id[k] for k in candidates}

    def corpus(self, candidates: Mapping[str, str]) -> float:
        """Corpus CIDEr x100: the mean of the per-sample values (pycocoevalcap's definition).

        With every id of ``references`` given, this equals ``Cider().compute_score`` on the full set.
        """
        _, vals = self._raw_scores(candidates)
        if vals.size == 0:
            raise ValueError("corpus CIDEr of an empty candidate set")
        return float(np.mean(vals)) * 100.0
