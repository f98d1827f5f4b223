"""Concreteness lexicon: how perceptually concrete a word is, on the 1 (abstract) – 5 (concrete) scale of
Brysbaert, Warriner & Kuperman (2014), "Concreteness ratings for 40 thousand generally known English
word lemmas", Behav. Res. Methods 46:904–911.

The Brysbaert table is not shipped (CC BY-NC-ND 3.0 forbids redistribution); :meth:`ConcretenessLexicon.from_csv`
reads a user's copy in its released format: a CSV or tab-separated file with a header holding at least
``Word`` and ``Conc.M`` (other columns such as ``Conc.SD``, ``Unknown``, ``Total``, ``Percent_known``,
``SUBTLEX``, ``Dom_Pos`` are ignored). :data:`BUILTIN_RATINGS` covers the vocabulary of the generated
scenes; its values are this project's own estimates on the same scale, not taken from the Brysbaert table.

Concrete Jungle (Im et al., arXiv 2604.13313) argues that perturbing concrete words gives more
informative hard negatives; :meth:`ConcretenessLexicon.normalised` maps a rating to ``(c - 1) / 4`` in
``[0, 1]``, the difficulty the perturbation engine attaches to a negative (a design choice, see
:mod:`datamodules.clip.perturb`).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping

MIN_RATING, MAX_RATING = 1.0, 5.0
NEUTRAL_RATING = 3.0

#: the project's own concreteness estimates for the generated scenes' vocabulary (1–5 scale)
BUILTIN_RATINGS: dict[str, float] = {
    # shapes: things one can point at
    "circle": 4.6, "square": 4.5, "triangle": 4.7, "diamond": 4.5, "cross": 4.3,
    # colours: seen directly, but properties rather than things
    "red": 4.2, "green": 4.1, "blue": 4.1, "yellow": 4.1, "purple": 4.0, "white": 4.0,
    # sizes: relative judgements
    "small": 3.1, "large": 3.0,
    # spatial relations
    "left": 2.7, "right": 2.5, "above": 2.6, "below": 2.5,
    # function words and the caption frame
    "a": 1.5, "and": 1.5, "of": 1.4, "there": 1.9, "is": 1.6, "picture": 4.4,
}


class LexiconError(ValueError):
    """A lexicon file that cannot be read as Brysbaert-format concreteness ratings."""


class ConcretenessLexicon:
    """Word -> concreteness rating; words not in the table get ``fallback`` (default the scale's middle, 3.0).

    Args:
        ratings: lower-case word -> rating in ``[1, 5]``.
        fallback: rating of a word that is not in ``ratings``.
        source: where the ratings come from (shown in messages).
    """

    def __init__(self, ratings: Mapping[str, float], fallback: float = NEUTRAL_RATING, source: str = "built-in") -> None:
        if not MIN_RATING <= fallback <= MAX_RATING:
            raise LexiconError(f"fallback rating must be in [{MIN_RATING}, {MAX_RATING}]; got {fallback}")
        self.ratings = {w.lower(): float(r) for w, r in ratings.items()}
        self.fallback = float(fallback)
        self.source = source

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word.lower() in self.ratings

    def __len__(self) -> int:
        return len(self.ratings)

    def rating(self, word: str) -> float:
        """The rating in ``[1, 5]`` (``fallback`` for an unknown word)."""
        return self.ratings.get(word.lower(), self.fallback)

    def normalised(self, word: str) -> float:
        """``(rating - 1) / 4`` in ``[0, 1]``."""
        return (self.rating(word) - MIN_RATING) / (MAX_RATING - MIN_RATING)

    @classmethod
    def builtin(cls, fallback: float = NEUTRAL_RATING) -> "ConcretenessLexicon":
        return cls(BUILTIN_RATINGS, fallback, "built-in")

    @classmethod
    def from_csv(cls, path: str | os.PathLike, word_column: str = "Word", rating_column: str = "Conc.M",
                 fallback: float = NEUTRAL_RATING, include_builtin: bool = True) -> "ConcretenessLexicon":
        """Read a Brysbaert-format file (comma- or tab-separated, detected from the header line).

        Rows with an empty word are skipped; a rating that is not a number in ``[1, 5]`` is an error
        naming the file and line. With ``include_builtin`` the built-in table fills words the file lacks.
        """
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = f.readline()
                f.seek(0)
                delimiter = "\t" if header.count("\t") > header.count(",") else ","
                reader = csv.DictReader(f, delimiter=delimiter)
                columns = reader.fieldnames or []
                missing = [c for c in (word_column, rating_column) if c not in columns]
                if missing:
                    raise LexiconError(
                        f"{path}: not a concreteness lexicon in the Brysbaert et al. (2014) format: missing "
                        f"column(s) {missing}; found {columns[:8]}. Expected a header with {word_column!r} and "
                        f"{rating_column!r} (set word_column / rating_column for other names)")
                ratings: dict[str, float] = {}
                for line, row in enumerate(reader, start=2):
                    word = (row.get(word_column) or "").strip()
                    if not word:
                        continue
                    raw = (row.get(rating_column) or "").strip().replace(",", ".") if delimiter == "\t" \
                        else (row.get(rating_column) or "").strip()
                    try:
                        value = float(raw)
                    except ValueError:
                        raise LexiconError(f"{path}:{line}: {rating_column} of {word!r} is not a number: {raw!r}") from None
                    if not (MIN_RATING <= value <= MAX_RATING) or math.isnan(value):
                        raise LexiconError(f"{path}:{line}: {rating_column} of {word!r} is {value}, outside "
                                           f"[{MIN_RATING}, {MAX_RATING}]")
                    ratings[word.lower()] = value
        except UnicodeDecodeError as e:
            raise LexiconError(f"{path}: not a UTF-8 text file ({e})") from None
        if not ratings:
            raise LexiconError(f"{path}: no ratings found")
        merged = {**BUILTIN_RATINGS, **ratings} if include_builtin else ratings
        return cls(merged, fallback, str(path))
