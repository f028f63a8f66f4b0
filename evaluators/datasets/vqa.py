"""VQA samples from VQAv2-style files (questions + annotations) or TextVQA's single-file format.

VQAv2 / shapes: ``{"questions": [{"image_id", "question", "question_id"}]}`` plus
``{"annotations": [{"question_id", "answers": [{"answer"}, ...], "answer_type", ...}]}``.
TextVQA: ``{"data": [{"question_id", "question", "image_id", "answers": [10 strings], ...}]}`` in one
file (OCR tokens are not used, as in the protocol); ``annotations_file`` may then be None.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from evaluators.datasets.base import DataError, SampleSource, require_dir, require_file
from evaluators.datasets.captions import entries_of, load_json

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


def read_vqa(questions_file: str | Path, annotations_file: str | Path | None) -> list[dict[str, Any]]:
    """Records ``{id, question, image_id, answers, ...}`` in question-file order, from a VQAv2-style pair
    of files or from one TextVQA file (``annotations_file`` is then ignored)."""
    qfile = require_file(questions_file, "VQA questions file (e.g. v2_OpenEnded_mscoco_val2014_questions.json)")
    qdata = load_json(qfile, "VQA questions file")
    if isinstance(qdata, dict) and "data" in qdata:
        data = entries_of(qdata, "data", qfile, "a TextVQA file like TextVQA_0.5.1_val.json")
        if annotations_file is not None:
            log.info("%s is in TextVQA format; ignoring annotations_file %s", qfile, annotations_file)
        return _read_textvqa(qfile, data)
    if isinstance(qdata, dict) and "questions" in qdata:
        questions = entries_of(qdata, "questions", qfile, "a VQAv2 questions file")
        if annotations_file is None:
            raise DataError(
                f"{qfile} is a VQAv2-style questions file; set annotations_file to the matching "
                "annotations file (e.g. v2_mscoco_val2014_annotations.json)"
            )
        afile = require_file(annotations_file, "VQA annotations file (e.g. v2_mscoco_val2014_annotations.json)")
        return _read_vqav2(qfile, questions, afile)
    raise DataError(f"{qfile} has neither a 'questions' list (VQAv2) nor a 'data' list (TextVQA)")


def _read_textvqa(qfile: Path, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in data:
        try:
            answers = d["answers"]
            rec = {"id": str(d["question_id"]), "question": str(d["question"]), "image_id": d["image_id"]}
        except KeyError as err:
            raise DataError(f"{qfile}: a TextVQA entry lacks the field {err}") from err
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{qfile}: question {rec['id']} has no 'answers' list (is this the test split?)")
        rec["answers"] = [str(a) for a in answers]
        out.append(rec)
    return out


def _read_vqav2(qfile: Path, questions: list[dict[str, Any]], afile: Path) -> list[dict[str, Any]]:
    annotations = entries_of(load_json(afile, "VQA annotations file"), "annotations", afile,
                             "a VQAv2 annotations file like v2_mscoco_val2014_annotations.json")
    by_qid: dict[str, dict[str, Any]] = {}
    for ann in annotations:
        try:
            by_qid[str(ann["question_id"])] = ann
        except KeyError as err:
            raise DataError(f"{afile}: an annotation lacks the field {err}") from err
    out = []
    missing = []
    for q in questions:
        try:
            qid = str(q["question_id"])
            rec = {"id": qid, "question": str(q["question"]), "image_id": q["image_id"]}
        except KeyError as err:
            raise DataError(f"{qfile}: a question lacks the field {err}") from err
        ann = by_qid.get(qid)
        if ann is None:
            missing.append(qid)
            continue
        try:
            rec["answers"] = [str(a["answer"]) for a in ann["answers"]]
        except (KeyError, TypeError) as err:
            raise DataError(f"{afile}: question {qid} has a malformed field 'answers' "
                            "(need a list of {\"answer\": ...})") from err
        if not rec["answers"]:
            raise DataError(f"{afile}: question {qid} has an empty 'answers' list")
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


def most_common_answer(answers: list[str]) -> str:
    """The answer given most often; ties go to the one given first."""
    return Counter(answers).most_common(1)[0][0]


class VQAQuestions(SampleSource):
    """Questions with their annotators' answers; ids (``str(question_id)``) in question-file order.

    ``demo_questions_file`` / ``demo_annotations_file``: the train split (VQAv2
    ``v2_OpenEnded_mscoco_train2014_questions.json`` + ``v2_mscoco_train2014_annotations.json``, TextVQA
    ``TextVQA_0.5.1_train.json``), read only when ``demonstrations()`` is called.
    """

    def __init__(
        self,
        questions_file: str | Path,
        annotations_file: str | Path | None,
        image_root: str | Path,
        image_pattern: str = "COCO_val2014_{image_id:012d}.jpg",
        demo_questions_file: str | Path | None = None,
        demo_annotations_file: str | Path | None = None,
    ):
        self.image_root = require_dir(image_root, "VQA image folder")
        self.image_pattern = image_pattern
        self.demo_files = (demo_questions_file, demo_annotations_file)
        self._demos: list[dict[str, Any]] | None = None
        records = read_vqa(questions_file, annotations_file)
        qfile = Path(questions_file)
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

    def demonstrations(self) -> list[dict[str, Any]]:
        """``{"question", "answer"}`` of every train question, answer = the most common of its answers.
        (open_flamingo's evaluation takes the first annotator's answer instead; see the README.)"""
        if self._demos is None:
            qfile, afile = self.demo_files
            if qfile is None:
                raise DataError("no train questions file configured (demo_questions_file); OpenFlamingo's "
                                "demonstrations need the train split")
            self._demos = [{"question": r["question"], "answer": most_common_answer(r["answers"])}
                           for r in read_vqa(qfile, afile)]
        return list(self._demos)

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
