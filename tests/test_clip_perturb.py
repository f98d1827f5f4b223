"""Perturbation engine: text negatives in SugarCrepe's categories, the concreteness lexicon, the
random-word control and image negatives (re-rendered scenes)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datamodules.clip.grammar import Caption, CaptionParseError, caption_holds, parse_caption
from datamodules.clip.lexicon import BUILTIN_RATINGS, ConcretenessLexicon, LexiconError
from datamodules.clip.perturb import (
    CATEGORIES, IMAGE_EDITS, CaptionPerturber, RandomWordPerturber, WordEdit, apply_edits, perturb_scene,
    perturb_scene_many, scene_edits,
)
from datamodules.clip.scenes import Scene, SceneObject, SceneSettings, build_scene_corpus, render_scene

CORPUS = build_scene_corpus(SceneSettings(seed=1, n_train=40, n_valid=0, n_test=0, n_zeroshot=0), use_cache=False)
LEX = ConcretenessLexicon.builtin()


def _phrases(cap: Caption) -> list:
    return [np_ for _, _, np_ in cap.noun_phrases()]


def classify(pos: Caption, neg: Caption) -> str:
    """The SugarCrepe category of ``neg`` derived from the two structures, independently of the engine."""
    if len(neg.clauses) == len(pos.clauses) + 1 and neg.clauses[:-1] == pos.clauses and neg.clauses[-1].relation is None:
        return "add_obj"
    assert len(neg.clauses) == len(pos.clauses) and neg.prefix == pos.prefix
    rels = [(a.relation, b.relation) for a, b in zip(pos.clauses, neg.clauses) if a.relation != b.relation]
    diffs = [(a, b) for a, b in zip(_phrases(pos), _phrases(neg)) if a != b]
    if rels:
        assert len(rels) == 1 and not diffs
        return "replace_rel"
    fields = [[f for f in ("shape", "colour", "size") if getattr(a, f) != getattr(b, f)] for a, b in diffs]
    assert all(len(f) == 1 for f in fields)
    if len(diffs) == 1:
        (a, b), (f,) = diffs[0], fields[0]
        if getattr(a, f) is None:
            return "add_att"
        assert getattr(b, f) is not None
        return "replace_obj" if f == "shape" else "replace_att"
    assert len(diffs) == 2 and fields[0] == fields[1]
    f = fields[0][0]
    (a1, b1), (a2, b2) = diffs
    assert getattr(b1, f) == getattr(a2, f) and getattr(b2, f) == getattr(a1, f)
    return "swap_obj" if f == "shape" else "swap_att"


def test_every_candidate_differs_in_exactly_the_recorded_words():
    perturber = CaptionPerturber()
    seen = Counter()
    for scene, caps in zip(CORPUS["train"].scenes, CORPUS["train"].captions):
        for text in caps[:2]:
            pos_toks = text.split(" ")
            for cat in CATEGORIES:
                for neg in perturber.candidates(text, cat, scene):
                    seen[cat] += 1
                    neg_toks = neg.text.split(" ")
                    assert apply_edits(pos_toks, neg.edits) == neg_toks
                    for e in neg.edits:
                        assert e.old != e.new and tuple(pos_toks[e.start:e.end]) == e.old
                        if e.old and e.new:  # minimal: the first and last words differ
                            assert e.old[0] != e.new[0] and e.old[-1] != e.new[-1]
                    # words outside the edits are untouched: same length change, same kept words
                    kept = [t for i, t in enumerate(pos_toks) if not any(e.start <= i < e.end for e in neg.edits)]
                    assert len(neg_toks) - len(pos_toks) == sum(len(e.new) - len(e.old) for e in neg.edits)
                    assert Counter(kept) <= Counter(neg_toks)
                    parsed = parse_caption(neg.text)  # still grammatical
                    assert parsed.text() == neg.text
                    assert classify(parse_caption(text), parsed) == neg.category == cat
                    assert not caption_holds(parsed, scene)  # false for the image
                    removed = [w for e in neg.edits for w in e.old] or [w for e in neg.edits for w in e.new]
                    assert neg.difficulty == pytest.approx(np.mean([LEX.normalised(w) for w in removed]))
    assert all(seen[c] > 0 for c in CATEGORIES), seen


def test_hand_cases():
    p = CaptionPerturber()
    scene = Scene((SceneObject("circle", "red", "small", 1, 0), SceneObject("square", "blue", "large", 1, 2)))
    text = "a small red circle left of a blue square"
    swaps = {n.text for n in p.candidates(text, "swap_obj", scene)}
    assert swaps == {"a small red square left of a blue circle"}
    assert {n.text for n in p.candidates(text, "swap_att", scene)} == {"a small blue circle left of a red square"}
    rel = {n.text: n.edits for n in p.candidates(text, "replace_rel", scene)}
    # "right of" only changes one word; "above"/"below" replace both words (all false: same row)
    assert rel["a small red circle right of a blue square"] == (WordEdit(4, 5, ("left",), ("right",)),)
    assert rel["a small red circle above a blue square"] == (WordEdit(4, 6, ("left", "of"), ("above",)),)
    add = {n.text: n.edits for n in p.candidates(text, "add_att", scene)}
    assert add["a small red circle left of a small blue square"] == (WordEdit(7, 7, (), ("small",)),)
    assert "a small red circle left of a large blue square" not in add  # true for the scene
    add_obj = {n.text for n in p.candidates(text, "add_obj", scene)}
    assert text + " and a cross" in add_obj and text + " and a blue square" not in add_obj
    # without the scene, swapping equal values is never a candidate
    assert p.candidates("a red circle left of a red square", "swap_att") == []


def test_concreteness_prefers_concrete_words():
    text = "a small red circle"  # colour (4.2) is more concrete than size (3.1)
    rng = np.random.default_rng(0)

    def colour_share(selection: str) -> float:
        p = CaptionPerturber(categories=("replace_att",), selection=selection)
        picks = [p.perturb(text, rng) for _ in range(300)]
        return np.mean([n.edits[0].old == ("red",) for n in picks])

    uniform, concrete = colour_share("uniform"), colour_share("concreteness")
    assert 0.7 < uniform < 0.95  # 5 colour candidates out of 6
    # exp(difficulty / T): five colour candidates at (4.2-1)/4, one size candidate at (3.1-1)/4, T = 0.1
    w_colour, w_size = 5 * np.exp((4.2 - 1) / 4 / 0.1), np.exp((3.1 - 1) / 4 / 0.1)
    expected = w_colour / (w_colour + w_size)
    assert abs(concrete - expected) < 4 * np.sqrt(expected * (1 - expected) / 300) + 1e-9
    assert concrete > uniform + 0.05
    assert LEX.normalised("red") > LEX.normalised("small")


def test_perturb_chooses_among_usable_categories_and_none():
    p = CaptionPerturber(categories=("swap_obj", "replace_rel"))
    assert p.perturb("a red circle", np.random.default_rng(0)) is None  # one phrase, no relation
    neg = p.perturb("a red circle left of a blue square", np.random.default_rng(0))
    assert neg is not None and neg.category in ("swap_obj", "replace_rel")
    with pytest.raises(ValueError, match="categories"):
        CaptionPerturber(categories=("swap_verbs",))


def test_perturb_many_gives_distinct_usable_categories_and_k1_is_perturb():
    p = CaptionPerturber()
    for scene, caps in zip(CORPUS["train"].scenes[:20], CORPUS["train"].captions):
        usable = {c for c in CATEGORIES if p.candidates(caps[0], c, scene)}
        for k in (1, 3, len(CATEGORIES)):
            negs = p.perturb_many(caps[0], np.random.default_rng(k), k, scene=scene)
            cats = [n.category for n in negs]
            assert len(cats) == len(set(cats)) == min(k, len(usable)) and set(cats) <= usable
            for n in negs:
                assert not caption_holds(n.text, scene) and classify(parse_caption(caps[0]), parse_caption(n.text)) == n.category
        # k = 1 is exactly perturb's draw (the compositional test items depend on it)
        assert p.perturb_many(caps[0], np.random.default_rng(7), 1, scene=scene) == [p.perturb(caps[0], np.random.default_rng(7), scene=scene)]
    text = CORPUS["train"].captions[0][0]
    r = RandomWordPerturber().perturb_many(text, np.random.default_rng(0), 5, scene=CORPUS["train"].scenes[0])
    assert 1 <= len(r) <= 5 and len({n.text for n in r}) == len(r)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            p.perturb_many(text, np.random.default_rng(0), bad)


def test_random_word_control():
    r = RandomWordPerturber()
    rng = np.random.default_rng(0)
    scene = CORPUS["train"].scenes[0]
    text = CORPUS["train"].captions[0][0]
    for _ in range(50):
        neg = r.perturb(text, rng, scene)
        assert neg.category == "random_word" and len(neg.edits) == 1
        assert apply_edits(text.split(" "), neg.edits) == neg.text.split(" ")
        e = neg.edits[0]
        assert e.end - e.start == 1 and e.old != e.new
        try:
            assert not caption_holds(neg.text, scene)
        except CaptionParseError:
            pass


def test_lexicon_csv_and_tsv(tmp_path):
    rows = "Word,Bigram,Conc.M,Conc.SD,Unknown,Total,Percent_known,SUBTLEX,Dom_Pos\n" \
           "apple,0,5,0,0,30,1,1000,Noun\nidea,0,1.61,0.9,0,30,1,500,Noun\n,0,3,0,0,0,0,0,\n"
    csv_path = tmp_path / "brysbaert.csv"
    csv_path.write_text(rows)
    lex = ConcretenessLexicon.from_csv(csv_path)
    assert lex.rating("Apple") == 5.0 and lex.rating("idea") == 1.61 and lex.normalised("apple") == 1.0
    assert lex.rating("circle") == BUILTIN_RATINGS["circle"]  # built-in table fills the rest
    assert lex.rating("zzz") == 3.0
    tsv = tmp_path / "b.txt"
    tsv.write_text(rows.replace(",", "\t"))
    assert ConcretenessLexicon.from_csv(tsv, include_builtin=False).ratings == {"apple": 5.0, "idea": 1.61}


@pytest.mark.parametrize("content, match", [
    ("word,rating\napple,5\n", r"wrong\.csv: not a concreteness lexicon.*'Conc\.M'"),
    ("Word,Conc.M\napple,high\n", r"wrong\.csv:2: Conc\.M of 'apple' is not a number"),
    ("Word,Conc.M\napple,4\npear,7\n", r"wrong\.csv:3: .*outside"),
    ("Word,Conc.M\n", r"wrong\.csv: no ratings"),
])
def test_lexicon_wrong_format_names_the_file(tmp_path, content, match):
    path = tmp_path / "wrong.csv"
    path.write_text(content)
    with pytest.raises(LexiconError, match=match):
        ConcretenessLexicon.from_csv(path)


def test_image_negatives():
    rng = np.random.default_rng(0)
    for scene, caps in zip(CORPUS["train"].scenes[:15], CORPUS["train"].captions):
        for kind in IMAGE_EDITS:
            got = perturb_scene(scene, rng, (kind,), caption=caps[0])
            if got is None:  # e.g. sizes the caption never mentions, or one object: nothing to exchange
                assert all(caption_holds(caps[0], s) for s, _ in scene_edits(scene, kind))
                continue
            new, edit = got
            assert edit.kind == kind and not caption_holds(caps[0], new) and caption_holds(caps[0], scene)
            changed = [i for i, (a, b) in enumerate(zip(scene.objects, new.objects)) if a != b]
            assert tuple(changed) == edit.objects
            if kind != "relation":
                (i,) = changed
                assert getattr(scene.objects[i], kind) == edit.old[0] and getattr(new.objects[i], kind) == edit.new[0]
                assert (render_scene(scene) != render_scene(new)).any()
            else:
                i, j = changed
                assert (new.objects[i].row, new.objects[i].col) == (scene.objects[j].row, scene.objects[j].col)


def test_perturb_scene_many_distinct_kinds_and_k1_is_perturb_scene():
    for scene, caps in zip(CORPUS["train"].scenes[:15], CORPUS["train"].captions):
        kinds = {k for k in IMAGE_EDITS if any(not caption_holds(caps[0], s) for s, _ in scene_edits(scene, k))}
        got = perturb_scene_many(scene, np.random.default_rng(1), len(IMAGE_EDITS), caption=caps[0])
        assert sorted(e.kind for _, e in got) == sorted(kinds)
        assert all(not caption_holds(caps[0], s) for s, _ in got)
        one = perturb_scene(scene, np.random.default_rng(2), caption=caps[0])
        assert perturb_scene_many(scene, np.random.default_rng(2), 1, caption=caps[0]) == ([one] if one else [])


def test_negatives_restricted_to_seen_combinations():
    """With ``combos``, no negative names or shows a (colour, shape) outside them, and the restriction only
    removes candidates."""
    from datamodules.clip.perturb import names_only, shows_only

    seen = frozenset((o.colour, o.shape) for s in CORPUS["train"].scenes for o in s.objects)
    assert 0 < len(seen) < 30  # the held-out combinations never occur in training scenes
    free, kept = CaptionPerturber(), CaptionPerturber(combos=seen)
    removed = 0
    for scene, caps in zip(CORPUS["train"].scenes[:20], CORPUS["train"].captions):
        for cat in CATEGORIES:
            a = {n.text for n in free.candidates(caps[0], cat, scene)}
            b = {n.text for n in kept.candidates(caps[0], cat, scene)}
            assert b <= a and all(names_only(parse_caption(t), seen) for t in b)
            assert all(names_only(parse_caption(t), seen) for t in a - b) is (a == b)
            removed += len(a - b)
        for s, _ in perturb_scene_many(scene, np.random.default_rng(0), len(IMAGE_EDITS), caption=caps[0], combos=seen):
            assert shows_only(s, seen)
    assert removed > 0
    r = RandomWordPerturber(combos=seen)
    rng = np.random.default_rng(0)
    for scene, caps in zip(CORPUS["train"].scenes[:20], CORPUS["train"].captions):
        neg = r.perturb(caps[0], rng, scene)
        try:
            assert names_only(parse_caption(neg.text), seen)
        except CaptionParseError:
            pass
