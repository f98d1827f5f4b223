"""Generated negatives for a batch of scene items: text (perturbed captions) and image (re-rendered scenes)."""
from __future__ import annotations

import numpy as np
import torch

from datamodules.clip.grammar import caption_holds
from datamodules.clip.loaders import image_transform
from datamodules.clip.negatives import SceneNegativeGenerator
from datamodules.clip.perturb import RandomWordPerturber
from datamodules.clip.scenes import Scene, SceneSettings, build_scene_corpus, render_scene

SPLIT = build_scene_corpus(SceneSettings(seed=2, n_train=16, n_valid=0, n_test=0, n_zeroshot=0), use_cache=False)["train"]
TRANSFORM = image_transform(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
TOKENS = sorted({w for caps in SPLIT.captions for c in caps for w in c.split()} | {"left", "right", "of", "above",
                                                                                     "below", "and", "a"})


def tokenize(texts):
    """A stand-in tokenizer that the test can invert: word index + 1, padded with 0."""
    vocab = {w: i + 1 for i, w in enumerate(sorted(set(TOKENS) | {w for t in texts for w in t.split()}))}
    TOKENS[:] = sorted(vocab)
    rows = [[vocab[w] for w in t.split()] for t in texts]
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def detokenize(ids):
    return [" ".join(TOKENS[int(i) - 1] for i in row if i > 0) for row in ids]


def test_text_and_image_negatives_for_a_batch():
    gen = SceneNegativeGenerator(SPLIT, tokenize, TRANSFORM, seed=0)
    scene_ids = [3, 0, 7, 3]
    caps = [SPLIT.captions[i][0] for i in scene_ids]
    text = gen.text_negatives(torch.tensor(scene_ids), caps, step=5)
    assert len(text) == 4 and text.owner.tolist() == [0, 1, 2, 3]
    assert text.ids.tolist() == [-1] * 4 and text.labels.tolist() == [-1] * 4
    for k, neg in enumerate(detokenize(text.inputs["ids"])):
        row = int(text.owner[k])
        assert neg != caps[row] and not caption_holds(neg, SPLIT.scenes[scene_ids[row]])
    assert text.difficulty.shape == (4,) and ((0 <= text.difficulty) & (text.difficulty <= 1)).all()
    # deterministic per (seed, step, scene): rows 0 and 3 are the same scene and caption
    assert torch.equal(text.inputs["ids"][0], text.inputs["ids"][3])
    again = gen.text_negatives(scene_ids, caps, step=5)
    assert torch.equal(again.inputs["ids"], text.inputs["ids"])
    assert set(text.contract_fields()) == {"inputs", "ids", "labels", "difficulty", "owner"}

    img = gen.image_negatives(scene_ids, caps, step=5)
    assert img.inputs["pixels"].shape == (len(img), 3, 64, 64) and img.difficulty is None
    for k in range(len(img)):
        row = int(img.owner[k])
        original = torch.from_numpy(render_scene(SPLIT.scenes[scene_ids[row]])).permute(2, 0, 1).float() / 255
        assert not torch.allclose(img.inputs["pixels"][k], original, atol=0.02)
    assert set(img.kinds) <= {"colour", "size", "shape", "relation"}


def test_items_without_a_negative_are_left_out():
    lone = SPLIT.scenes[0]
    split = type(SPLIT)([Scene(lone.objects[:1])], [["a picture of a " + lone.objects[0].shape]],
                        SPLIT.images[:1], np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    # a caption naming only the shape: no size/colour edit falsifies it, no relation to exchange
    gen = SceneNegativeGenerator(split, tokenize, TRANSFORM, image_kinds=("colour", "size", "relation"))
    out = gen.image_negatives([0], split.captions[0])
    assert len(out) == 0 and out.inputs["pixels"].shape == (0, 3, 64, 64)
    ctrl = SceneNegativeGenerator(SPLIT, tokenize, TRANSFORM, perturber=RandomWordPerturber())
    out = ctrl.text_negatives([1, 2], [SPLIT.captions[1][0], SPLIT.captions[2][0]])
    assert out.kinds == ["random_word", "random_word"]


def test_several_negatives_per_item_grouped_by_owner():
    gen = SceneNegativeGenerator(SPLIT, tokenize, TRANSFORM, seed=0)
    scene_ids = [3, 0, 7]
    caps = [SPLIT.captions[i][0] for i in scene_ids]
    one = gen.text_negatives(scene_ids, caps, step=2)
    many = gen.text_negatives(scene_ids, caps, step=2, per_item=4)
    counts = torch.bincount(many.owner, minlength=3)
    assert (counts >= 1).all() and (counts <= 4).all() and len(many) > len(one)
    assert many.owner.tolist() == sorted(many.owner.tolist()) and many.difficulty.shape == (len(many),)
    for row in range(3):  # distinct categories per item, each false for its scene
        kinds = [c for c, o in zip(many.kinds, many.owner.tolist()) if o == row]
        assert len(kinds) == len(set(kinds))
    negs = detokenize(many.inputs["ids"])
    assert all(not caption_holds(n, SPLIT.scenes[scene_ids[int(o)]]) for n, o in zip(negs, many.owner))
    # the first negative of each item is the one-per-item draw
    first = [negs[int(torch.nonzero(many.owner == r)[0])] for r in range(3)]
    assert first == detokenize(one.inputs["ids"])
    img = gen.image_negatives(scene_ids, caps, step=2, per_item=3)
    assert img.inputs["pixels"].shape[0] == len(img) > 3 and (torch.bincount(img.owner, minlength=3) <= 3).all()
    for row in range(3):
        kinds = [k for k, o in zip(img.kinds, img.owner.tolist()) if o == row]
        assert len(kinds) == len(set(kinds))
