"""VQA samples from VQAv2-style files (questions + annotations) or TextVQA's single-file format.

VQAv2 / shapes: ``{"questions": [{"image_id", "question", "question_id"}]}`` plus
``{"annotations": [{"question_id", "answers": [{"answer"}, ...], "answer_type", ...}]}``.
TextVQA: ``{"data": [{"question_id", "question", "image_id", "answers": [10 strings], ...}]}`` in one
file (OCR tokens are not used, as in the protocol); ``annotations_file`` may then be None.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evaluators.datasets.base import DataError, SampleSource, require_dir, require_file
from evaluators.datasets.captions import load_json

log = logging.getLogger(__name__)


def format_image_name(pattern: str, image_id: Any) -> str:
    """``pattern.format(image_id=...)``; a numeric id stored as a string still fits ``{image_id:012d}``."""
    try:
        return pattern.format(image_id=image_id)
    except (ValueError, TypeError):
        if isinstance(image_id, str) and image_id.strip().isdigit():
            return pattern.format(image_id=int(image_id))
        raise
    except (KeyError, IndexError) as e:
        raise DataError(f"image_pattern {pattern!r} may only use the field {{image_id}}") from e


class VQAQuestions(SampleSource):
    """Questions with their annotators' answers; ids (``str(question_id)``) in question-file order."""

    def __init__(
        self,
        questions_file: str | Path,
        annotations_file: str | Path | None,
        image_root: str | Path,
        image_pattern: str = "COCO_val2014_{image_id:012d}.jpg",
    ):
        qfile = require_file(questions_file, "VQA questions file (e.g. v2_OpenEnded_mscoco_val2014_questions.json)")
        self.image_root = require_dir(image_root, "VQA image folder")
        self.image_pattern = image_pattern
        qdata = load_json(qfile, "VQA questions file")
        if isinstance(qdata, dict) and isinstance(qdata.get("data"), list):
            records = self._read_textvqa(qfile, qdata["data"])
            if annotations_file is not None:
                log.info("%s is in TextVQA format; ignoring annotations_file %s", qfile, annotations_file)
        elif isinstance(qdata, dict) and isinstance(qdata.get("questions"), list):
            if annotations_file is None:
                raise DataError(
                    f"{qfile} is a VQAv2-style questions file; set annotations_file to the matching "
                    "annotations file (e.g. v2_mscoco_val2014_annotations.json)"
                )
            afile = require_file(annotations_file, "VQA annotations file (e.g. v2_mscoco_val2014_annotations.json)")
            records = self._read_vqav2(qfile, qdata["questions"], afile)
        else:
            raise DataError(f"{qfile} has neither a 'questions' list (VQAv2) nor a 'data' list (TextVQA)")
        if records:  # a pattern that does not fit the ids fails here, not in the middle of a run
            try:
                format_image_name(image_pattern, records[0]["image_id"])
            except (ValueError, TypeError) as e:
                raise DataError(f"image_pattern {image_pattern!r} does not fit image_id "
                                f"{records[0]['image_id']!r} of {qfile.name} ({e})") from e
        self._samples: dict[str, dict[str, Any]] = {}
        for r in records:
            if r["id"] in self._samples:
                raise DataError(f"{qfile}: question_id {r['id']} appears twice")
            self._samples[r["id"]] = r
        odd = sum(len(r["answers"]) != 10 for r in records)
        if odd:
            log.warning("%d questions of %s do not have 10 answers; accuracy uses leave-one-out over those given",
                        odd, qfile.name)
        self._ids = list(self._samples)
        log.info("%s: %d questions", qfile.name, len(self._ids))

    @staticmethod
    def _read_textvqa(qfile: Path, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for d in data:
            try:
                answers = [str(a) for a in d["answers"]]
                rec = {"id": str(d["question_id"]), "question": str(d["question"]), "image_id": d["image_id"],
                       "answers": answers}
            except KeyError as err:
                raise DataError(f"{qfile}: a TextVQA entry lacks {err}") from err
            if not answers:
                raise DataError(f"{qfile}: question {rec['id']} has no answers (is this the test split?)")
            out.append(rec)
        return out

    @staticmethod
    def _read_vqav2(qfile: Path, questions: list[dict[str, Any]], afile: Path) -> list[dict[str, Any]]:
        adata = load_json(afile, "VQA annotations file")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise DataError(f"{afile} has no 'annotations' list; expected a VQAv2 annotations file")
        by_qid: dict[str, dict[str, Any]] = {}
        for ann in adata["annotations"]:
            try:
                by_qid[str(ann["question_id"])] = ann
            except KeyError as err:
                raise DataError(f"{afile}: an annotation lacks {err}") from err
        out = []
        missing = []
        for q in questions:
            try:
                qid = str(q["question_id"])
                rec = {"id": qid, "question": str(q["question"]), "image_id": q["image_id"]}
            except KeyError as err:
                raise DataError(f"{qfile}: a question lacks {err}") from err
            ann = by_qid.get(qid)
            if ann is None:
                missing.append(qid)
                continue
            try:
                rec["answers"] = [str(a["answer"]) for a in ann["answers"]]
            except (KeyError, TypeError) as err:
                raise DataError(f"{afile}: question {qid} has malformed 'answers' (need a list of {{answer}})") from err
            if not rec["answers"]:
                raise DataError(f"{afile}: question {qid} has no answers")
            for key in ("answer_type", "question_type", "multiple_choice_answer"):
                if key in ann:
                    rec[key] = ann[key]
            out.append(rec)
        if missing:
            raise DataError(
                f"{afile} has no annotation for {len(missing)} of {len(questions)} questions of {qfile.name} "
                f"(e.g. question_id {missing[0]}); use the annotations file of the same split"
            )
        return out

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def get(self, sample_id: str) -> dict[str, Any]:
        if sample_id not in self._samples:
            raise KeyError(f"no question {sample_id!r}")
        r = self._samples[sample_id]
        out = {
            "id": sample_id,
            "image_path": str(self.image_root / format_image_name(self.image_pattern, r["image_id"])),
            "question": r["question"],
            "answers": list(r["answers"]),
            "image_id": r["image_id"],
        }
        for key in ("answer_type", "question_type", "multiple_choice_answer"):
            if key in r:
                out[key] = r[key]
        return out
