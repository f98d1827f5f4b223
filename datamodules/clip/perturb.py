"""Hard negatives for image–text training: perturbed captions (text negatives) and re-rendered scenes
(image negatives).

Text negatives follow SugarCrepe's categories (Hsieh et al., NeurIPS 2023 D&B, arXiv 2306.14610) on the
scene grammar of :mod:`datamodules.clip.grammar`:

- ``replace_obj``: one shape word replaced by another shape;
- ``replace_att``: one colour or size word replaced by another of its kind;
- ``replace_rel``: one relation replaced by another ("left of" -> "above");
- ``swap_obj``: the shapes of two noun phrases exchanged, attributes kept in place;
- ``swap_att``: the colours (or sizes) of two noun phrases exchanged;
- ``add_obj``: a clause "and a [colour] shape" appended;
- ``add_att``: a colour or size inserted into a noun phrase that has none.

Every :class:`CaptionNegative` records its category and its :class:`WordEdit` list: applying the edits
to the positive's words gives the negative's words (:func:`apply_edits`), each edit is minimal (its
first and last words differ), and outside the edits the two captions are equal. Given the scene, only
negatives that are false for it are produced. The negative still parses under the grammar.

Word choice (ConcretePlant of Concrete Jungle, Im et al., arXiv 2604.13313, which prefers perturbing
concrete words): with ``selection="concreteness"`` a candidate is drawn with probability proportional to
``exp(difficulty / temperature)``; ``"uniform"`` draws uniformly. A negative's ``difficulty`` in ``[0, 1]``
is the mean normalised concreteness (:meth:`ConcretenessLexicon.normalised`) of the words the edit
removes, or of the words it inserts when it removes none. This mapping is this project's design (the
paper's formula is not public); it is meant as the per-pair input of a Cement-style margin
``m = m0 + m1 * difficulty``.

:class:`RandomWordPerturber` is the control: one uniformly chosen word replaced by a uniformly chosen
vocabulary word, whatever its role (the result need not parse).

Image negatives (:func:`perturb_scene`): the scene with one object's colour, size or shape changed, or two
objects' cells exchanged (a relation change), re-rendered by the caller with :func:`render_scene`.

Plausibility (``combos``): every engine can be restricted to a set of (colour, shape) combinations, the
ones that occur in the training positives. A training negative that names (or shows) a combination no
positive ever has is recognisable from that alone, without looking at the image: SugarCrepe's argument
against negatives that a text-only model can spot (Hsieh et al. 2023), here with a harmful twist, since the generated
scenes hold some combinations out of training: the model learns "an unseen combination is always false"
and then rejects the true captions of the test scenes, which all contain one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Collection, Sequence

import numpy as np

from datamodules.clip.grammar import (
    ARTICLE, COLOURS, CONJUNCTION, RELATIONS, SHAPES, SIZES, VOCABULARY, Caption, CaptionParseError, Clause,
    NounPhrase, caption_holds, parse_caption,
)
from datamodules.clip.lexicon import ConcretenessLexicon
from datamodules.clip.scenes import Combo, Scene

CATEGORIES: tuple[str, ...] = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
RANDOM_CATEGORY = "random_word"
SELECTIONS = ("concreteness", "uniform")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {"colour": COLOURS, "size": SIZES}


@dataclass(frozen=True)
class WordEdit:
    """Words ``[start, end)`` of the positive (``old``) replaced by ``new``; ``start == end`` inserts."""

    start: int
    end: int
    old: tuple[str, ...]
    new: tuple[str, ...]


@dataclass(frozen=True)
class CaptionNegative:
    text: str
    positive: str
    category: str
    edits: tuple[WordEdit, ...]
    difficulty: float

    @property
    def changed_words(self) -> tuple[str, ...]:
        return tuple(w for e in self.edits for w in e.old + e.new)


def names_only(caption: Caption, combos: Collection[Combo] | None) -> bool:
    """Whether every noun phrase of ``caption`` that names a colour names a (colour, shape) of ``combos``
    (``None``: any)."""
    return combos is None or all(np_.colour is None or (np_.colour, np_.shape) in combos
                                 for _, _, np_ in caption.noun_phrases())


def shows_only(scene: Scene, combos: Collection[Combo] | None) -> bool:
    """Whether every object of ``scene`` is a (colour, shape) of ``combos`` (``None``: any)."""
    return combos is None or all((o.colour, o.shape) in combos for o in scene.objects)


def apply_edits(tokens: Sequence[str], edits: Sequence[WordEdit]) -> list[str]:
    """``tokens`` with every edit applied (edits must not overlap)."""
    out = list(tokens)
    for e in sorted(edits, key=lambda e: e.start, reverse=True):
        if tuple(out[e.start:e.end]) != e.old:
            raise ValueError(f"edit {e} does not match words {out[e.start:e.end]}")
        out[e.start:e.end] = e.new
    return out


def _minimal(start: int, old: Sequence[str], new: Sequence[str]) -> WordEdit:
    """The edit ``old -> new`` at ``start`` with common leading and trailing words dropped."""
    old, new = list(old), list(new)
    while old and new and old[0] == new[0]:
        old.pop(0), new.pop(0)
        start += 1
    while old and new and old[-1] == new[-1]:
        old.pop(), new.pop()
    return WordEdit(start, start + len(old), tuple(old), tuple(new))


class CaptionPerturber:
    """SugarCrepe-category text negatives for captions of the scene grammar.

    Args:
        lexicon: concreteness ratings (default: the built-in table).
        categories: the categories to draw from (default: all of :data:`CATEGORIES`).
        selection: ``"concreteness"`` (prefer concrete words) or ``"uniform"``.
        temperature: sharpness of the concreteness preference (smaller = more concrete).
        combos: the (colour, shape) combinations a negative may name (module docstring); ``None``: any.
    """

    def __init__(self, lexicon: ConcretenessLexicon | None = None, categories: Sequence[str] = CATEGORIES,
                 selection: str = "concreteness", temperature: float = 0.1,
                 combos: Collection[Combo] | None = None) -> None:
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            raise ValueError(f"unknown perturbation categories {unknown}; expected a non-empty subset of {CATEGORIES}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        self.lexicon = lexicon or ConcretenessLexicon.builtin()
        self.categories = tuple(categories)
        self.selection = selection
        self.temperature = float(temperature)
        self.combos = None if combos is None else frozenset(combos)

    # ------------------------------------------------------------------------------ candidates
    def _negative(self, positive: str, negative: Caption, category: str, edits: Sequence[WordEdit]) -> CaptionNegative:
        removed = [w for e in edits for w in e.old]
        words = removed or [w for e in edits for w in e.new]
        difficulty = sum(self.lexicon.normalised(w) for w in words) / len(words)
        return CaptionNegative(negative.text(), positive, category, tuple(edits), float(difficulty))

    def candidates(self, caption: Caption | str, category: str, scene: Scene | None = None) -> list[CaptionNegative]:
        """Every negative of ``category`` for ``caption`` that names only :attr:`combos`; with ``scene``,
        only those false for it."""
        cap = parse_caption(caption) if isinstance(caption, str) else caption
        toks, slots = cap.tokens_and_slots()
        raw: list[tuple[Caption, str, list[WordEdit]]] = []  # (negative, category, edits)

        def replace_word(ci: int, role: str, field: str, np_: NounPhrase, values: Sequence[str], cat: str) -> None:
            cur = getattr(np_, field)
            span = slots[(ci, role, field)]
            for v in values:
                if v != cur:
                    neg = cap.with_phrase(ci, role, replace(np_, **{field: v}))
                    raw.append((neg, cat, [WordEdit(span.start, span.end, (cur,), (v,))]))

        phrases = list(cap.noun_phrases())
        if category == "replace_obj":
            for ci, role, np_ in phrases:
                replace_word(ci, role, "shape", np_, SHAPES, category)
        elif category == "replace_att":
            for ci, role, np_ in phrases:
                for field, values in ATTRIBUTE_VALUES.items():
                    if getattr(np_, field) is not None:
                        replace_word(ci, role, field, np_, values, category)
        elif category == "replace_rel":
            for ci, cl in enumerate(cap.clauses):
                if cl.relation is None:
                    continue
                span = slots[(ci, "relation", "relation")]
                for rel in RELATIONS:
                    if rel != cl.relation:
                        neg = cap.with_clause(ci, replace(cl, relation=rel))
                        raw.append((neg, category, [_minimal(span.start, RELATIONS[cl.relation], RELATIONS[rel])]))
        elif category in ("swap_obj", "swap_att"):
            fields = ("shape",) if category == "swap_obj" else tuple(ATTRIBUTE_VALUES)
            for (ci, ri, a), (cj, rj, b) in itertools.combinations(phrases, 2):
                for field in fields:
                    va, vb = getattr(a, field), getattr(b, field)
                    if va is None or vb is None or va == vb:
                        continue
                    neg = cap.with_phrase(ci, ri, replace(a, **{field: vb})).with_phrase(cj, rj, replace(b, **{field: va}))
                    sa, sb = slots[(ci, ri, field)], slots[(cj, rj, field)]
                    raw.append((neg, category, [WordEdit(sa.start, sa.end, (va,), (vb,)),
                                                WordEdit(sb.start, sb.end, (vb,), (va,))]))
        elif category == "add_obj":
            for shape in SHAPES:
                for colour in (None, *COLOURS):
                    np_ = NounPhrase(shape, colour)
                    neg = replace(cap, clauses=cap.clauses + (Clause(np_),))
                    new = (CONJUNCTION, ARTICLE, *([colour] if colour else []), shape)
                    raw.append((neg, category, [WordEdit(len(toks), len(toks), (), new)]))
        elif category == "add_att":
            for ci, role, np_ in phrases:
                start = slots[(ci, role, "np")].start
                if np_.size is None:  # the size goes right after the article
                    for v in SIZES:
                        neg = cap.with_phrase(ci, role, replace(np_, size=v))
                        raw.append((neg, category, [WordEdit(start + 1, start + 1, (), (v,))]))
                if np_.colour is None:  # the colour goes right before the shape
                    at = slots[(ci, role, "shape")].start
                    for v in COLOURS:
                        neg = cap.with_phrase(ci, role, replace(np_, colour=v))
                        raw.append((neg, category, [WordEdit(at, at, (), (v,))]))
        else:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        if self.combos is not None:
            raw = [r for r in raw if names_only(r[0], self.combos)]
        if scene is not None:  # the truth is checked on the structure; only the kept negatives are rendered
            raw = [r for r in raw if not caption_holds(r[0], scene)]
        positive = cap.text()
        return [self._negative(positive, neg, cat, edits) for neg, cat, edits in raw]

    # ------------------------------------------------------------------------------- sampling
    def _pick(self, cands: Sequence[CaptionNegative], rng: np.random.Generator) -> CaptionNegative:
        if self.selection == "uniform":
            return cands[int(rng.integers(len(cands)))]
        d = np.array([c.difficulty for c in cands]) / self.temperature
        p = np.exp(d - d.max())
        return cands[int(rng.choice(len(cands), p=p / p.sum()))]

    def perturb(self, caption: Caption | str, rng: np.random.Generator, category: str | None = None,
                scene: Scene | None = None) -> CaptionNegative | None:
        """One negative: ``category`` if given, else a category drawn uniformly among those of
        :attr:`categories` that have a candidate for this caption; ``None`` when none has."""
        if category is not None:
            cands = self.candidates(caption, category, scene)
            return self._pick(cands, rng) if cands else None
        got = self.perturb_many(caption, rng, 1, scene)
        return got[0] if got else None

    def perturb_many(self, caption: Caption | str, rng: np.random.Generator, k: int,
                     scene: Scene | None = None) -> list[CaptionNegative]:
        """Up to ``k`` negatives of distinct categories: the first ``k`` categories of a uniformly random
        order of :attr:`categories` that have a candidate for this caption, one negative each (fewer when
        fewer categories apply). ``k = 1`` draws exactly as :meth:`perturb`."""
        if k < 1:
            raise ValueError(f"k must be a positive integer; got {k}")
        out: list[CaptionNegative] = []
        for i in rng.permutation(len(self.categories)):  # the usable categories in a uniform random order
            cands = self.candidates(caption, self.categories[int(i)], scene)
            if cands:
                out.append(self._pick(cands, rng))
                if len(out) == k:
                    break
        return out


class RandomWordPerturber:
    """The control: one word at a uniform position replaced by a different uniform vocabulary word.

    With ``scene``, a replacement that leaves a caption true for the scene is redrawn (up to ``max_tries``),
    as is one that parses and names a (colour, shape) outside ``combos`` (module docstring; ``None``: any).
    The difficulty is the normalised concreteness of the removed word, as for :class:`CaptionPerturber`.
    """

    def __init__(self, lexicon: ConcretenessLexicon | None = None, vocabulary: Sequence[str] = VOCABULARY,
                 max_tries: int = 20, combos: Collection[Combo] | None = None) -> None:
        if len(set(vocabulary)) < 2:
            raise ValueError("the vocabulary needs at least two words")
        self.lexicon = lexicon or ConcretenessLexicon.builtin()
        self.vocabulary = tuple(dict.fromkeys(vocabulary))
        self.max_tries = max_tries
        self.combos = None if combos is None else frozenset(combos)

    def perturb(self, caption: str, rng: np.random.Generator, scene: Scene | None = None) -> CaptionNegative | None:
        toks = caption.split(" ")
        for _ in range(self.max_tries):
            i = int(rng.integers(len(toks)))
            choices = [w for w in self.vocabulary if w != toks[i]]
            new = choices[int(rng.integers(len(choices)))]
            neg = toks[:i] + [new] + toks[i + 1:]
            text = " ".join(neg)
            if scene is not None or self.combos is not None:
                try:
                    parsed = parse_caption(text)
                except CaptionParseError:
                    parsed = None  # an ungrammatical caption describes no scene and names no combination
                if parsed is not None and ((scene is not None and caption_holds(parsed, scene))
                                           or not names_only(parsed, self.combos)):
                    continue
            return CaptionNegative(text, caption, RANDOM_CATEGORY, (WordEdit(i, i + 1, (toks[i],), (new,)),),
                                   self.lexicon.normalised(toks[i]))
        return None

    def perturb_many(self, caption: str, rng: np.random.Generator, k: int,
                     scene: Scene | None = None) -> list[CaptionNegative]:
        """Up to ``k`` distinct negatives from ``k`` draws of :meth:`perturb` (duplicates dropped); ``k = 1``
        draws exactly as :meth:`perturb`."""
        if k < 1:
            raise ValueError(f"k must be a positive integer; got {k}")
        out: dict[str, CaptionNegative] = {}
        for _ in range(k):
            neg = self.perturb(caption, rng, scene=scene)
            if neg is not None:
                out.setdefault(neg.text, neg)
        return list(out.values())


# ------------------------------------------------------------------------------------- image negatives

IMAGE_EDITS: tuple[str, ...] = ("colour", "size", "shape", "relation")


def image_edit_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple, checked to be a non-empty subset of :data:`IMAGE_EDITS`."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in IMAGE_EDITS]
    if unknown or not kinds:
        raise ValueError(f"unknown scene edits {unknown}; expected a non-empty subset of {IMAGE_EDITS}")
    return kinds


@dataclass(frozen=True)
class SceneEdit:
    """``kind`` in :data:`IMAGE_EDITS`; ``objects`` the indices changed; ``old``/``new`` the values
    (for ``relation``: the two objects' cells, exchanged)."""

    kind: str
    objects: tuple[int, ...]
    old: tuple
    new: tuple


def scene_edits(scene: Scene, kind: str) -> list[tuple[Scene, SceneEdit]]:
    """Every scene that differs from ``scene`` by one edit of ``kind``."""
    objs = scene.objects
    out: list[tuple[Scene, SceneEdit]] = []
    if kind in ("colour", "size", "shape"):
        values = {"colour": COLOURS, "size": SIZES, "shape": SHAPES}[kind]
        for i, o in enumerate(objs):
            for v in values:
                if v != getattr(o, kind):
                    new = objs[:i] + (replace(o, **{kind: v}),) + objs[i + 1:]
                    out.append((Scene(new), SceneEdit(kind, (i,), (getattr(o, kind),), (v,))))
    elif kind == "relation":
        for i, j in itertools.combinations(range(len(objs)), 2):
            a, b = objs[i], objs[j]
            if (a.shape, a.colour, a.size) == (b.shape, b.colour, b.size):
                continue  # exchanging identical objects changes nothing
            new = list(objs)
            new[i], new[j] = replace(a, row=b.row, col=b.col), replace(b, row=a.row, col=a.col)
            out.append((Scene(tuple(new)), SceneEdit(kind, (i, j), ((a.row, a.col), (b.row, b.col)),
                                                     ((b.row, b.col), (a.row, a.col)))))
    else:
        raise ValueError(f"unknown scene edit {kind!r}; expected one of {IMAGE_EDITS}")
    return out


def perturb_scene(scene: Scene, rng: np.random.Generator, kinds: Sequence[str] = IMAGE_EDITS,
                  caption: Caption | str | None = None,
                  combos: Collection[Combo] | None = None) -> tuple[Scene, SceneEdit] | None:
    """A scene with one attribute or relation changed (kind uniform among ``kinds`` that apply, then an
    edit uniform within it). With ``caption`` (true for ``scene``), only scenes for which it is false:
    a text->image hard negative; with ``combos``, only scenes whose objects are all of ``combos``.
    ``None`` when no edit qualifies."""
    got = perturb_scene_many(scene, rng, 1, kinds, caption, combos)
    return got[0] if got else None


def perturb_scene_many(scene: Scene, rng: np.random.Generator, k: int, kinds: Sequence[str] = IMAGE_EDITS,
                       caption: Caption | str | None = None,
                       combos: Collection[Combo] | None = None) -> list[tuple[Scene, SceneEdit]]:
    """Up to ``k`` edited scenes of distinct kinds (each kind drawn uniformly among the applicable ones
    not drawn yet, then an edit uniform within it), as :func:`perturb_scene`; ``k = 1`` draws exactly as
    :func:`perturb_scene`."""
    if k < 1:
        raise ValueError(f"k must be a positive integer; got {k}")
    if isinstance(caption, str):
        caption = parse_caption(caption)
    by_kind = {}
    for kind in kinds:
        cands = [c for c in scene_edits(scene, kind) if shows_only(c[0], combos)]
        if caption is not None:
            cands = [c for c in cands if not caption_holds(caption, c[0])]
        if cands:
            by_kind[kind] = cands
    out: list[tuple[Scene, SceneEdit]] = []
    while by_kind and len(out) < k:
        cands = by_kind.pop(list(by_kind)[int(rng.integers(len(by_kind)))])
        out.append(cands[int(rng.integers(len(cands)))])
    return out
