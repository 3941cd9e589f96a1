"""Scoring a model's answer against the reference, the way VQA benchmarks do.

Short answers: exact match after normalisation (case, punctuation, articles, spaces).
Multiple choice (``choices`` given): the option letter the answer names or starts with.
Yes/no questions: the first yes/no word of the answer.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_LETTER = re.compile(r"^\s*\(?(?:([A-Z])(?:[\).:]|\s|$)|([a-z])[\).:])")


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, white space folded."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def option_letter(text: str, choices: list[str] | None = None) -> str | None:
    """The option letter an answer names: "B", "(B)", "B. cat" or the text of choice B."""
    norm = normalize(text)
    for i, choice in enumerate(choices or []):
        if norm and norm == normalize(choice):
            return chr(ord("A") + i)
    m = _LETTER.match(str(text))
    letter = m and (m[1] or m[2]).upper()
    if letter and (choices is None or ord(letter) - ord("A") < len(choices)):
        return letter
    return None


def reference_letter(answer, choices: list[str]) -> str | None:
    """The correct option's letter from an answer given as the option's text, a letter or
    an index (in that order: an answer "3" among options "2", "3", "4" is the text "3")."""
    if isinstance(answer, int):
        return chr(ord("A") + answer)
    letter = option_letter(str(answer), choices)
    if letter is None and str(answer).strip().isdigit() and int(answer) < len(choices):
        return chr(ord("A") + int(answer))
    return letter


def is_correct(prediction: str, answer, choices: list[str] | None = None) -> bool:
    """Whether ``prediction`` answers the question whose reference answer is ``answer``."""
    if choices:
        ref = reference_letter(answer, choices)
        return ref is not None and option_letter(prediction, choices) == ref
    ref = normalize(answer)
    pred = normalize(prediction)
    if ref in ("yes", "no"):
        words = [w for w in pred.split() if w in ("yes", "no")]
        return bool(words) and words[0] == ref
    return pred == ref
