"""Generated compositional scenes: grammar, truth of captions, held-out split, determinism, cache."""
from __future__ import annotations

import os

import numpy as np
import pytest

from datamodules.clip.grammar import (
    COLOURS, SHAPES, Caption, CaptionParseError, Clause, NounPhrase, caption_holds, parse_caption, truth_matrix,
)
from datamodules.clip.scenes import (
    PALETTE, Scene, SceneError, SceneObject, SceneSettings, build_scene_corpus, describe_scene, held_out_combos,
    render_scene,
)

SMALL = SceneSettings(seed=3, n_train=60, n_valid=10, n_test=20, n_zeroshot=10)

RED_LEFT_BLUE = Scene((SceneObject("circle", "red", "small", 1, 0), SceneObject("square", "blue", "large", 1, 2)))


def test_parse_round_trip_and_slots():
    cap = Caption((Clause(NounPhrase("circle", "red", "small"), "left", NounPhrase("square", "blue")),
                   Clause(NounPhrase("cross"))), ("there", "is"))
    text = cap.text()
    assert text == "there is a small red circle left of a blue square and a cross"
    assert parse_caption(text) == cap
    toks, slots = cap.tokens_and_slots()
    assert toks[slots[(0, "relation", "relation")].start:slots[(0, "relation", "relation")].end] == ["left", "of"]
    assert toks[slots[(0, "object", "np")].start:slots[(0, "object", "np")].end] == ["a", "blue", "square"]
    assert toks[slots[(1, "subject", "shape")].start] == "cross"
    # "a picture of" is a prefix, not a noun phrase
    assert parse_caption("a picture of a circle").prefix == ("a", "picture", "of")


@pytest.mark.parametrize("bad, where", [("a red", "end of caption"), ("a circle left a square", "'of'"),
                                        ("a circle beside a square", "'beside'"), ("red circle", "'red'"),
                                        ("a red small circle", "'small'"), ("", "''")])
def test_parse_errors_name_the_word(bad, where):
    with pytest.raises(CaptionParseError, match=where):
        parse_caption(bad)


def test_caption_truth_by_hand():
    assert caption_holds("a small red circle left of a blue square", RED_LEFT_BLUE)
    assert caption_holds("a square right of a circle", RED_LEFT_BLUE)
    assert not caption_holds("a red circle right of a blue square", RED_LEFT_BLUE)   # relation
    assert not caption_holds("a blue circle left of a red square", RED_LEFT_BLUE)    # attribute binding
    assert not caption_holds("a circle above a square", RED_LEFT_BLUE)               # same row
    assert not caption_holds("a large red circle", RED_LEFT_BLUE)                     # size
    assert not caption_holds("a circle left of a circle", RED_LEFT_BLUE)              # two distinct objects
    assert caption_holds("a red circle and a large square", RED_LEFT_BLUE)
    assert not caption_holds("a red circle and a cross", RED_LEFT_BLUE)


def test_truth_matrix():
    other = Scene((SceneObject("circle", "red", "large", 0, 0),))
    caps = ["a red circle", "a small red circle left of a blue square", "a large circle"]
    assert truth_matrix(caps, [RED_LEFT_BLUE, other]) == [[True, True], [True, False], [False, True]]


def test_described_captions_hold_and_parse():
    rng = np.random.default_rng(0)
    corpus = build_scene_corpus(SMALL, use_cache=False)
    for split in corpus.splits.values():
        for scene, caps in zip(split.scenes, split.captions):
            assert 1 <= len(caps) <= SMALL.captions_per_image and len(set(caps)) == len(caps)
            for c in caps:
                assert parse_caption(c).text() == c
                assert caption_holds(c, scene)
    # several distinct paraphrases for a multi-object scene
    assert len(describe_scene(RED_LEFT_BLUE, rng, 3)) == 3


def test_held_out_combos_split():
    held = held_out_combos(0)
    assert len(held) == len(COLOURS)
    assert {c for c, _ in held} == set(COLOURS)
    train_combos = {(c, s) for c in COLOURS for s in SHAPES} - held
    assert {s for _, s in train_combos} == set(SHAPES)  # every shape still seen in training
    corpus = build_scene_corpus(SMALL, use_cache=False)
    for s in corpus["train"].scenes:
        assert not any((o.colour, o.shape) in corpus.held_out for o in s.objects)
    for split in ("valid", "test"):
        for s in corpus[split].scenes:
            assert any((o.colour, o.shape) in corpus.held_out for o in s.objects)
    assert all(len(s.objects) == 1 for s in corpus["zeroshot"].scenes)
    assert [SHAPES[i] for i in corpus["zeroshot"].labels] == [s.objects[0].shape for s in corpus["zeroshot"].scenes]
    with pytest.raises(SceneError):
        held_out_combos(0, per_colour=len(SHAPES))


def test_render_colours_and_positions():
    img = render_scene(RED_LEFT_BLUE, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # centre of the red circle (row 1, column 0) and of the blue square (row 1, column 2)
    cell = 64 / 3
    assert tuple(img[int(1.5 * cell), int(0.5 * cell)]) == PALETTE["red"]
    assert tuple(img[int(1.5 * cell), int(2.5 * cell)]) == PALETTE["blue"]
    assert tuple(img[2, 2]) == (0, 0, 0)
    big = render_scene(Scene((SceneObject("circle", "red", "large", 1, 1),)), 64)
    small = render_scene(Scene((SceneObject("circle", "red", "small", 1, 1),)), 64)
    assert (big.sum(-1) > 0).sum() > 2 * (small.sum(-1) > 0).sum()


def test_groups_mark_identical_scene_graphs():
    from datamodules.clip.scenes import _group_ids
    a = Scene((SceneObject("circle", "red", "small", 0, 0), SceneObject("cross", "blue", "small", 2, 2)))
    b = Scene((SceneObject("cross", "blue", "small", 1, 2, 0.05), SceneObject("circle", "red", "small", 0, 1)))
    c = Scene((SceneObject("circle", "red", "small", 2, 0), SceneObject("cross", "blue", "small", 0, 2)))
    assert a.graph_key() == b.graph_key() != c.graph_key()
    assert _group_ids([a, b, c]).tolist() == [0, 0, 2]


def test_deterministic_and_cached_atomically(tmp_path, monkeypatch):
    a = build_scene_corpus(SMALL, use_cache=False)
    b = build_scene_corpus(SMALL, use_cache=False)
    assert a["test"].captions == b["test"].captions and np.array_equal(a["train"].images, b["train"].images)
    other = build_scene_corpus(SceneSettings(**{**SMALL.__dict__, "seed": 4}), use_cache=False)
    assert other["train"].captions != a["train"].captions
    monkeypatch.setenv("CONTRASTIVE_CACHE", str(tmp_path / "env"))
    c = build_scene_corpus(SMALL)
    assert c.path is not None and c.path.parent == tmp_path / "env" / "clip"
    assert [p.name for p in c.path.parent.iterdir()] == [c.path.name]  # no temporary file left
    mtime = os.path.getmtime(c.path)
    d = build_scene_corpus(SMALL)  # read back, not regenerated
    assert os.path.getmtime(d.path) == mtime
    assert d["valid"].captions == a["valid"].captions and np.array_equal(d["test"].images, a["test"].images)
    assert d["test"].groups.tolist() == a["test"].groups.tolist() and d.held_out == a.held_out
    c.path.write_bytes(b"broken")  # a damaged cache is regenerated
    e = build_scene_corpus(SMALL)
    assert e["train"].captions == a["train"].captions


def test_bad_settings():
    with pytest.raises(SceneError, match="max_objects"):
        build_scene_corpus(SceneSettings(max_objects=10), use_cache=False)
