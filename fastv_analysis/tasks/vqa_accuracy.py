"""The VQA soft accuracy with the EvalAI answer normalisation, as LLaVA scores TextVQA
(``llava/eval/m4c_evaluator.py``: ``EvalAIAnswerProcessor`` + ``TextVQAAccuracyEvaluator``)
and prepares VQAv2 submissions (``scripts/convert_vqav2_for_submission.py``).

Normalisation, in the official order: lower case, drop "," and "?", split "'s" off
("cat's" -> "cat 's"); newlines/tabs to spaces; each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
is deleted where it touches a space (or the text has a digit,digit comma) and else becomes
a space; periods not followed by a digit are deleted (the official pattern's look-behind
is malformed and acts as this; its third argument, ``re.UNICODE`` = 32, is a *count*, so at
most 32 go); then per word: number words zero..ten (and "none") to digits, articles
a/an/the dropped, the standard contraction table applied ("dont" -> "don't").

Soft accuracy of a prediction: for each of the ten human answers left out in turn,
min(1, matches among the other nine / 3); the mean of the ten. With c of the ten equal to
the prediction: c=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.

Two pipelines use it, and they normalise differently:

- TextVQA (:func:`soft_accuracy`, LLaVA's ``m4c_evaluator.TextVQAAccuracyEvaluator``): the
  EvalAI processor on the prediction *and* on every human answer.
- VQAv2 (:func:`vqav2_accuracy`): LLaVA's ``scripts/convert_vqav2_for_submission.py`` runs
  the EvalAI processor on the prediction only; the official evaluator (GT-Vision-Lab/VQA
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) then strips "\n"/"\t" on both sides and,
  only when the ten human answers are not all identical, applies its own punctuation and
  digit/article steps (no lower-casing before them, no "'s" split, a comma rule that needs
  exactly one comma between digits) to the humans and to the uploaded answer. Ten identical
  human answers stay raw: "t-shirt" x 10 against an uploaded "t shirt" scores 0.
"""

from __future__ import annotations

import re
from functools import lru_cache

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_DIGIT_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
_VQAEVAL_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")  # vqaEval's commaStrip: exactly one comma
_PERIOD = re.compile(r"\.(?!\d)")

# The standard VQA contraction table: "written form -> canonical form", one pair a line.
_CONTRACTION_TABLE = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
_CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_TABLE.replace("\n", "|").split("|") if pair.strip())


def _punctuation(text: str, digit_comma_pattern: re.Pattern = _DIGIT_COMMA) -> str:
    out = text
    digit_comma = digit_comma_pattern.search(text) is not None
    for p in _PUNCTUATION:
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if touches_space or digit_comma else " ")
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


@lru_cache(maxsize=1 << 16)  # human answers repeat a lot (VQAv2 val: 2.1M of them)
def normalize_answer(text: str) -> str:
    """The EvalAI / m4c answer normalisation (module docstring)."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def soft_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Mean over the ten leave-one-out subsets of min(1, matches / 3), both sides normalised."""
    if len(human_answers) != 10:
        raise ValueError(f"VQA accuracy needs ten human answers, got {len(human_answers)}")
    pred = normalize_answer(prediction)
    return _leave_one_out(sum(normalize_answer(a) == pred for a in human_answers))


def _leave_one_out(count: int) -> float:
    """Mean over the ten leave-one-out subsets of min(1, matches / 3), ``count`` of ten equal."""
    # leaving out one of the `count` equal answers leaves count-1 matches, any other leaves count
    return (count * min(1.0, (count - 1) / 3) + (10 - count) * min(1.0, count / 3)) / 10 if count else 0.0


def vqaeval_process(text: str) -> str:
    """vqaEval.py's ``processPunctuation`` then ``processDigitArticle`` (module docstring)."""
    return _digits_articles(_punctuation(text, _VQAEVAL_DIGIT_COMMA))


def vqav2_accuracy(prediction: str, human_answers: list[str]) -> float:
    """VQAv2 accuracy of a raw model answer as LLaVA uploads it and vqaEval.py scores it."""
    if len(human_answers) != 10:
        raise ValueError(f"VQA accuracy needs ten human answers, got {len(human_answers)}")

    def spaces(t: str) -> str:
        return t.replace("\n", " ").replace("\t", " ").strip()

    uploaded = spaces(normalize_answer(prediction))
    humans = [spaces(str(a)) for a in human_answers]
    if len(set(humans)) > 1:
        humans = [vqaeval_process(a) for a in humans]
        uploaded = vqaeval_process(uploaded)
    return _leave_one_out(sum(a == uploaded for a in humans))
