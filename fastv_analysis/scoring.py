"""Scoring a model's answer against the reference, the way VQA benchmarks do.

Short answers: exact match after normalisation (case, punctuation, articles, spaces).
Yes/no questions: the first yes/no word of the answer.

Multiple choice (``choices`` given): both sides become sets of option indices, and the
prediction is correct iff the sets intersect.

- Reference: an ``int`` is an option index (0 = A; ``data`` keeps JSON integers as ints
  only for this). A string is a bare option letter ("B", "(B)", "B.") if that option
  exists, else the option(s) whose normalised text it equals. A digit string is never an
  index: with options "1", "0" the answer "0" is option B, the text it reads.
- Prediction: a bare letter ("B", "(B)", "b)") if that option exists; else the option(s)
  whose normalised text equals the prediction's; else a leading letter ("B. cat",
  "(B) cat", "B cat") if that option exists; else nothing (wrong).

Letters come before texts on both sides, so options that are themselves letters read as
letters. Duplicated option texts make a set: with options "cat", "cat", "dog" and
reference B, "cat" names the right content and is correct, "A" is not.
"""

from __future__ import annotations

import numbers
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_LETTER = re.compile(r"^\s*\(?(?:([A-Z])(?:[\).:]|\s|$)|([a-z])[\).:])")
_BARE_LETTER = re.compile(r"^\s*\(?\s*(?:([A-Z])[\).:]*|([a-z])[\).:]+)\s*$")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, white space folded."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _letter_index(match: re.Match | None, choices: list[str]) -> set[int]:
    """The option a matched letter names, if there is such an option."""
    if not match:
        return set()
    i = ord((match[1] or match[2]).upper()) - ord("A")
    return {i} if i < len(choices) else set()


def _text_options(text: str, choices: list[str]) -> set[int]:
    """The options whose normalised text equals ``text``'s (several if texts repeat)."""
    norm = normalize(text)
    return {i for i, choice in enumerate(choices) if norm == normalize(choice)} if norm else set()


def reference_options(answer, choices: list[str]) -> set[int]:
    """The correct options' indices: an int answer is an index, a string a bare letter or
    else an option text. Empty when the answer names no option."""
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        return {int(answer)} if 0 <= answer < len(choices) else set()
    text = str(answer)
    return _letter_index(_BARE_LETTER.match(text), choices) or _text_options(text, choices)


def prediction_options(text: str, choices: list[str]) -> set[int]:
    """The options a prediction names: a bare letter, else an option text, else a leading
    letter ("B. cat"). Empty when it names none."""
    text = str(text)
    return (_letter_index(_BARE_LETTER.match(text), choices) or _text_options(text, choices)
            or _letter_index(_LETTER.match(text), choices))


def is_correct(prediction: str, answer, choices: list[str] | None = None) -> bool:
    """Whether ``prediction`` answers the question whose reference answer is ``answer``."""
    if choices:
        return bool(prediction_options(prediction, choices) & reference_options(answer, choices))
    ref = normalize(answer)
    pred = normalize(prediction)
    if ref in ("yes", "no"):
        words = [w for w in pred.split() if w in ("yes", "no")]
        return bool(words) and words[0] == ref
    return pred == ref
