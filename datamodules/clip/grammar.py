"""The caption grammar of the generated scenes: vocabulary, structured captions, parser and truth check.

Captions are lower-case words separated by single spaces::

    CAPTION := PREFIX? CLAUSE ("and" CLAUSE)*
    PREFIX  := "there is" | "a picture of"
    CLAUSE  := NP (RELATION NP)?
    NP      := "a" SIZE? COLOUR? SHAPE
    RELATION:= "left of" | "right of" | "above" | "below"

No vocabulary word starts with a vowel, so the article is always "a". A :class:`Caption` renders to
tokens together with the token span of every slot (size, colour, shape of each noun phrase, each
relation), which the perturbation engine uses to record exactly which words a negative changes.

Truth: a caption *holds* for a scene when every clause is satisfied by some objects of the scene (a
relation needs two distinct objects); a noun phrase matches an object when the shape and every
attribute it mentions are equal. Relations are read from the objects' grid cells: ``left of`` means a
smaller column, ``above`` a smaller row (:func:`relation_holds`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from datamodules.clip.scenes import Scene, SceneObject

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
#: relation name -> its words in a caption
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("left", "of"), "right": ("right", "of"), "above": ("above",), "below": ("below",),
}
CONVERSE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
PREFIXES: tuple[tuple[str, ...], ...] = ((), ("there", "is"), ("a", "picture", "of"))
ARTICLE = "a"
CONJUNCTION = "and"
#: every word a caption of the grammar can contain
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    (*SHAPES, *COLOURS, *SIZES, *(w for ws in RELATIONS.values() for w in ws),
     *(w for p in PREFIXES for w in p), ARTICLE, CONJUNCTION)))


class CaptionParseError(ValueError):
    """A caption that the scene grammar cannot parse."""


@dataclass(frozen=True)
class NounPhrase:
    """``a [size] [colour] shape``; ``None`` for an attribute the phrase does not mention."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: "SceneObject") -> bool:
        return (obj.shape == self.shape and (self.colour is None or obj.colour == self.colour)
                and (self.size is None or obj.size == self.size))


@dataclass(frozen=True)
class Clause:
    """A noun phrase, optionally related to a second one (``subject relation object``)."""

    subject: NounPhrase
    relation: str | None = None
    object: NounPhrase | None = None

    def __post_init__(self) -> None:
        if (self.relation is None) != (self.object is None):
            raise ValueError("a clause has both a relation and an object, or neither")


@dataclass(frozen=True)
class Span:
    """Token positions ``[start, end)`` of one slot of a caption."""

    start: int
    end: int


#: a slot of a caption: (clause index, role, field) with role "subject" | "object" | "relation" and
#: field "size" | "colour" | "shape" | "np" (the whole noun phrase) | "relation"
SlotKey = tuple[int, str, str]


@dataclass(frozen=True)
class Caption:
    """A caption of the grammar as a structure; :meth:`text` renders it."""

    clauses: tuple[Clause, ...]
    prefix: tuple[str, ...] = ()

    def tokens_and_slots(self) -> tuple[list[str], dict[SlotKey, Span]]:
        """The words and the span of every slot (see :data:`SlotKey`)."""
        toks: list[str] = list(self.prefix)
        slots: dict[SlotKey, Span] = {}

        def np_tokens(ci: int, role: str, np_: NounPhrase) -> None:
            start = len(toks)
            toks.append(ARTICLE)
            for field in ("size", "colour", "shape"):
                word = getattr(np_, field)
                if word is not None:
                    slots[(ci, role, field)] = Span(len(toks), len(toks) + 1)
                    toks.append(word)
            slots[(ci, role, "np")] = Span(start, len(toks))

        for ci, cl in enumerate(self.clauses):
            if ci:
                toks.append(CONJUNCTION)
            np_tokens(ci, "subject", cl.subject)
            if cl.relation is not None:
                words = RELATIONS[cl.relation]
                slots[(ci, "relation", "relation")] = Span(len(toks), len(toks) + len(words))
                toks.extend(words)
                np_tokens(ci, "object", cl.object)  # type: ignore[arg-type]
        return toks, slots

    def tokens(self) -> list[str]:
        return self.tokens_and_slots()[0]

    def text(self) -> str:
        return " ".join(self.tokens())

    def noun_phrases(self) -> Iterator[tuple[int, str, NounPhrase]]:
        """``(clause index, role, phrase)`` for every noun phrase, in reading order."""
        for ci, cl in enumerate(self.clauses):
            yield ci, "subject", cl.subject
            if cl.object is not None:
                yield ci, "object", cl.object

    def with_phrase(self, ci: int, role: str, np_: NounPhrase) -> "Caption":
        clauses = list(self.clauses)
        clauses[ci] = replace(clauses[ci], **{role: np_})
        return replace(self, clauses=tuple(clauses))

    def with_clause(self, ci: int, clause: Clause) -> "Caption":
        clauses = list(self.clauses)
        clauses[ci] = clause
        return replace(self, clauses=tuple(clauses))


# ------------------------------------------------------------------------------------------ parsing

_RELATION_FIRST = {words[0]: (name, words) for name, words in RELATIONS.items()}


def parse_caption(text: str) -> Caption:
    """Parse ``text`` under the grammar; raises :class:`CaptionParseError` naming the offending word."""
    toks = text.split(" ")
    pos = 0

    def fail(expected: str) -> CaptionParseError:
        got = repr(toks[pos]) if pos < len(toks) else "end of caption"
        return CaptionParseError(f"cannot parse caption {text!r}: expected {expected} at word {pos}, got {got}")

    prefix: tuple[str, ...] = ()
    for p in sorted(PREFIXES, key=len, reverse=True):
        # "a picture of" shares its first word with a noun phrase: only the full prefix counts
        if p and tuple(toks[:len(p)]) == p:
            prefix, pos = p, len(p)
            break

    def noun_phrase() -> NounPhrase:
        nonlocal pos
        if pos >= len(toks) or toks[pos] != ARTICLE:
            raise fail(f"{ARTICLE!r}")
        pos += 1
        size = colour = None
        if pos < len(toks) and toks[pos] in SIZES:
            size, pos = toks[pos], pos + 1
        if pos < len(toks) and toks[pos] in COLOURS:
            colour, pos = toks[pos], pos + 1
        if pos >= len(toks) or toks[pos] not in SHAPES:
            raise fail("a shape" + ("" if colour else " or colour" if size else ", colour or size"))
        shape, pos = toks[pos], pos + 1
        return NounPhrase(shape, colour, size)

    clauses: list[Clause] = []
    while True:
        subject = noun_phrase()
        relation = obj = None
        if pos < len(toks) and toks[pos] in _RELATION_FIRST:
            relation, words = _RELATION_FIRST[toks[pos]]
            if tuple(toks[pos:pos + len(words)]) != words:
                pos += 1
                raise fail(repr(words[1]))
            pos += len(words)
            obj = noun_phrase()
        clauses.append(Clause(subject, relation, obj))
        if pos == len(toks):
            return Caption(tuple(clauses), prefix)
        if toks[pos] != CONJUNCTION:
            raise fail(f"{CONJUNCTION!r}, a relation or the end")
        pos += 1


# ------------------------------------------------------------------------------------------- truth

def relation_holds(relation: str, a: "SceneObject", b: "SceneObject") -> bool:
    """``a relation b`` from grid cells (row 0 is the top row, column 0 the left column)."""
    if relation == "left":
        return a.col < b.col
    if relation == "right":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(RELATIONS)}")


def relations_between(a: "SceneObject", b: "SceneObject") -> list[str]:
    """Every relation that holds for ``a relation b`` (at least one when the cells differ)."""
    return [r for r in RELATIONS if relation_holds(r, a, b)]


def clause_holds(clause: Clause, objects: Sequence["SceneObject"]) -> bool:
    if clause.relation is None:
        return any(clause.subject.matches(o) for o in objects)
    assert clause.object is not None
    return any(clause.subject.matches(a) and clause.object.matches(b) and relation_holds(clause.relation, a, b)
               for a, b in itertools.permutations(objects, 2))


def caption_holds(caption: Caption | str, scene: "Scene") -> bool:
    """True when every clause of ``caption`` is satisfied by objects of ``scene``."""
    cap = parse_caption(caption) if isinstance(caption, str) else caption
    return all(clause_holds(cl, scene.objects) for cl in cap.clauses)


def truth_matrix(captions: Sequence[str], scenes: Sequence["Scene"]) -> list[list[bool]]:
    """``out[i][j]``: caption ``i`` holds for scene ``j``. For generated data this is the exact set of
    false negatives: a caption that holds for another image is one of that image's true descriptions.
    Each distinct caption is parsed once."""
    parsed = {c: parse_caption(c) for c in dict.fromkeys(captions)}
    return [[caption_holds(parsed[c], s) for s in scenes] for c in captions]
