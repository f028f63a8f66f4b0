"""VQA accuracy with the official answer normalisation (VQA challenge evaluation, GT-Vision-Lab/VQA).

Accuracy of one prediction against n annotator answers (n = 10 in VQAv2 and TextVQA) is the mean over
the n leave-one-out subsets of ``min(1, #subset answers equal to the prediction / 3)``.

Normalisation (steps as in the official ``vqaEval.py``):

1. newlines/tabs -> spaces, strip;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space
   in the input, or when the input has a comma between two digits ("1,000" -> "1000"), and is replaced by
   a space otherwise; then every "." not followed by a digit is deleted (the official regex passes
   ``re.UNICODE`` where ``re.sub`` expects ``count``, so at most 32 periods go; kept for fidelity);
3. lower-case, number words "none"/"zero".."ten" -> digits, articles a/an/the dropped, contractions
   without apostrophe restored ("dont" -> "don't").

When each step applies (``gt_normalisation``):

- ``"always"`` (default; RobustVLM / open_flamingo's copy of the evaluation): the prediction and every
  ground-truth answer go through steps 1-3.
- ``"if_disagree"`` (the official script, GT-Vision-Lab/VQA at its last fix, commit a013f00): everything
  gets step 1; steps 2-3 are applied, to the prediction and the answers alike, only when the (stripped)
  answers are not all identical. A prediction "yes." then scores 0 against ten answers "yes", and 1 under
  "always". (Before that fix the official script normalised the prediction always and the answers only
  with step 2 when they disagreed.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GT_NORMALISATIONS = ("always", "if_disagree")

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit ("3.5" keeps its period).
_LONE_PERIOD = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_COUNT = 32  # int(re.UNICODE), see the module docstring

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The apostrophised forms the official evaluation restores. Its lookup table maps every spelling of one of
# these with exactly ONE apostrophe left out to the full form ("couldnt've" and "couldn'tve" ->
# "couldn't've"); it is rebuilt from this list below.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've shouldn't shouldn't've
should've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _CONTRACTED:
        for pos, ch in enumerate(full):
            if ch == "'":
                table[full[:pos] + full[pos + 1:]] = full
    # One entry of the official table goes the other way; kept so results match it.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    """Step 2 of the normalisation (see the module docstring)."""
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        # the test looks at the ORIGINAL text, as the official code does
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _LONE_PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Step 3: lower-case, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Steps 1-3: the normal form answers are compared in."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _check_mode(gt_normalisation: str) -> None:
    if gt_normalisation not in GT_NORMALISATIONS:
        raise ValueError(f"gt_normalisation must be one of {GT_NORMALISATIONS}, got {gt_normalisation!r}")


def normalize_pair(prediction: str, answers: Sequence[str], gt_normalisation: str = "always") -> tuple[str, list[str]]:
    """The prediction and the ground-truth answers as the chosen convention compares them."""
    _check_mode(gt_normalisation)
    if gt_normalisation == "always":
        return normalize_answer(prediction), [normalize_answer(a) for a in answers]
    refs = [_clean_whitespace(a) for a in answers]
    pred = _clean_whitespace(prediction)
    if len(set(refs)) > 1:
        return normalize_answer(pred), [normalize_answer(a) for a in refs]
    return pred, refs


def vqa_accuracy(prediction: str, answers: Sequence[str], gt_normalisation: str = "always") -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotators' answers."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError("vqa_accuracy needs a non-empty list of ground-truth answers")
    pred, refs = normalize_pair(prediction, answers, gt_normalisation)
    matches = sum(r == pred for r in refs)
    # leaving out answer i removes one match when answer i itself matches
    total = sum(min(1.0, (matches - (r == pred)) / 3.0) for r in refs)
    return total / len(refs)
