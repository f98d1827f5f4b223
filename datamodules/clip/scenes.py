"""Generated compositional scenes: the vision–language setting's embedded default data.

A :class:`Scene` places 1–4 objects (shape, colour, size) in distinct cells of a 3x3 grid, with a small
jitter; :func:`render_scene` draws it with PIL (``(H, W, 3)`` uint8, black background) and
:func:`describe_scene` writes several paraphrased captions under the grammar of
:mod:`datamodules.clip.grammar` that bind attributes to shapes and relate pairs of objects ("a small
red circle left of a blue square"). Every caption holds for its scene (:func:`caption_holds`).

Compositional split: :func:`held_out_combos` picks, per colour, shapes whose (colour, shape)
combination never occurs in a training scene; every valid and test scene contains at least one
held-out combination, so retrieval on the test split measures compositional generalisation. The
``zeroshot`` split holds single-object scenes whose class is the shape.

:func:`build_scene_corpus` generates everything from a seed (same settings, same bytes) and caches it
as one ``.npz`` file, written atomically, under ``cache_dir`` or ``$CONTRASTIVE_CACHE/clip`` or
``~/.cache/contrastive/clip``; the file name carries a fingerprint of the settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from contrastive.io import atomic_write
from datamodules.clip.grammar import (
    COLOURS, CONVERSE, PREFIXES, SHAPES, SIZES, Caption, Clause, NounPhrase, caption_holds, relations_between,
)

log = logging.getLogger("datamodules.clip")

GRID = 3
SCENE_SPLITS: tuple[str, ...] = ("train", "valid", "test", "zeroshot")
CACHE_FORMAT = "contrastive.clip.scenes"
CACHE_VERSION = 1  # bump whenever sampling, rendering or captioning changes
#: RGB of each colour word
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "purple": (150, 60, 205), "white": (240, 240, 240),
}
#: object radius as a fraction of the grid cell
RADIUS: dict[str, float] = {"small": 0.22, "large": 0.42}


class SceneError(ValueError):
    """Scene settings that cannot produce a corpus."""


@dataclass(frozen=True)
class SceneObject:
    """One object: attributes and grid cell (row 0 = top); ``dx, dy`` jitter in cell fractions."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    def graph_key(self) -> tuple:
        """Equal for scenes with the same scene graph: the same objects (attributes) and the same
        pairwise relations. Scenes with equal keys are known false negatives of each other."""
        objs = sorted(self.objects, key=lambda o: (o.shape, o.colour, o.size, o.row, o.col))
        attrs = tuple((o.shape, o.colour, o.size) for o in objs)
        rels = tuple((int(np.sign(a.col - b.col)), int(np.sign(a.row - b.row)))
                     for i, a in enumerate(objs) for b in objs[i + 1:])
        return attrs, rels

    def to_json(self) -> list[list]:
        return [[o.shape, o.colour, o.size, o.row, o.col, round(o.dx, 4), round(o.dy, 4)] for o in self.objects]

    @classmethod
    def from_json(cls, rows: Sequence[Sequence]) -> "Scene":
        return cls(tuple(SceneObject(str(s), str(c), str(z), int(r), int(k), float(dx), float(dy))
                         for s, c, z, r, k, dx, dy in rows))


Combo = tuple[str, str]  # (colour, shape)


def held_out_combos(seed: int, per_colour: int = 1) -> frozenset[Combo]:
    """``per_colour`` shapes per colour whose combination is withheld from training, spread so that
    every shape is held out about equally often and every colour and shape still occurs in training."""
    if not 0 <= per_colour < len(SHAPES):
        raise SceneError(f"held_out_per_colour must be in [0, {len(SHAPES) - 1}]; got {per_colour}")
    perm = np.random.default_rng([seed, 7919]).permutation(len(SHAPES))
    out = set()
    for ci, colour in enumerate(COLOURS):
        for k in range(per_colour):
            out.add((colour, SHAPES[int(perm[(ci * per_colour + k) % len(SHAPES)])]))
    return frozenset(out)


def sample_scene(rng: np.random.Generator, n_objects: int, combos: Sequence[Combo],
                 first_combos: Sequence[Combo] | None = None, jitter: float = 0.08) -> Scene:
    """``n_objects`` objects in distinct cells; attributes uniform over ``combos`` (the first object over
    ``first_combos`` when given), sizes uniform, jitter uniform in ``[-jitter, jitter]`` cell fractions."""
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    objs = []
    for i, cell in enumerate(cells):
        pool = first_combos if (i == 0 and first_combos) else combos
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        dx, dy = (float(v) for v in rng.uniform(-jitter, jitter, size=2))
        objs.append(SceneObject(shape, colour, size, int(cell) // GRID, int(cell) % GRID, dx, dy))
    return Scene(tuple(objs))


# ---------------------------------------------------------------------------------------- rendering

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise SceneError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 2) -> np.ndarray:
    """The scene as a ``(image_size, image_size, 3)`` uint8 array (drawn ``supersample``x larger, then
    box-filtered down for anti-aliased edges)."""
    big = image_size * supersample
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cell = big / GRID
    for o in scene.objects:
        cx, cy = (o.col + 0.5 + o.dx) * cell, (o.row + 0.5 + o.dy) * cell
        _draw_shape(draw, o.shape, cx, cy, RADIUS[o.size] * cell, PALETTE[o.colour])
    if supersample > 1:
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------- captions

def _phrase(o: SceneObject, rng: np.random.Generator, p_omit_size: float, p_omit_colour: float) -> NounPhrase:
    size = None if rng.random() < p_omit_size else o.size
    colour = None if rng.random() < p_omit_colour else o.colour
    return NounPhrase(o.shape, colour, size)


def _describe_once(scene: Scene, rng: np.random.Generator, p_omit_size: float, p_omit_colour: float) -> Caption:
    order = rng.permutation(len(scene.objects))
    objs = [scene.objects[int(i)] for i in order]
    clauses = []
    for i in range(0, len(objs) - 1, 2):
        a, b = objs[i], objs[i + 1]
        rels = relations_between(a, b)
        rel = rels[int(rng.integers(len(rels)))]
        if rng.random() < 0.5:  # the converse reading: "b <converse> a"
            a, b, rel = b, a, CONVERSE[rel]
        clauses.append(Clause(_phrase(a, rng, p_omit_size, p_omit_colour), rel,
                              _phrase(b, rng, p_omit_size, p_omit_colour)))
    if len(objs) % 2:
        clauses.append(Clause(_phrase(objs[-1], rng, p_omit_size, p_omit_colour)))
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))]
    return Caption(tuple(clauses), prefix)


def describe_scene(scene: Scene, rng: np.random.Generator, n_captions: int = 3, p_omit_size: float = 0.25,
                   p_omit_colour: float = 0.1, max_tries: int = 50) -> list[str]:
    """Up to ``n_captions`` distinct paraphrases: objects in a random order, paired into relation clauses
    (a relation that holds, read either way), an optional prefix, attributes sometimes left out."""
    out: list[str] = []
    for _ in range(max_tries):
        text = _describe_once(scene, rng, p_omit_size, p_omit_colour).text()
        if text not in out:
            out.append(text)
            if len(out) == n_captions:
                break
    assert all(caption_holds(t, scene) for t in out)
    return out


# ------------------------------------------------------------------------------------------ corpus

@dataclass(frozen=True)
class SceneSettings:
    """Everything that determines a generated corpus (its cache fingerprint)."""

    seed: int = 0
    n_train: int = 8000
    n_valid: int = 500
    n_test: int = 1000
    n_zeroshot: int = 500
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 3
    held_out_per_colour: int = 1
    p_omit_size: float = 0.25
    p_omit_colour: float = 0.1
    jitter: float = 0.08

    def validate(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise SceneError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}; got "
                             f"{self.min_objects}, {self.max_objects}")
        if self.n_train <= 0 or min(self.n_valid, self.n_test, self.n_zeroshot) < 0:
            raise SceneError("n_train must be positive and n_valid, n_test, n_zeroshot non-negative")
        if self.captions_per_image < 1 or self.image_size < 8:
            raise SceneError("captions_per_image must be >= 1 and image_size >= 8")

    def fingerprint(self) -> str:
        blob = json.dumps({"v": CACHE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


@dataclass
class SceneSplit:
    """One split: ``images`` uint8 ``(N, H, W, 3)``; ``captions[i]`` the paraphrases of scene ``i``;
    ``groups[i]`` the scene-graph group id (equal ids = identical scene graphs = known false negatives);
    ``labels[i]`` the class index of the first object's shape in :data:`SHAPES` (the zero-shot class)."""

    scenes: list[Scene]
    captions: list[list[str]]
    images: np.ndarray
    groups: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scenes)


@dataclass
class SceneCorpus:
    settings: SceneSettings
    held_out: frozenset[Combo]
    splits: dict[str, SceneSplit] = field(default_factory=dict)
    path: Path | None = None

    def __getitem__(self, split: str) -> SceneSplit:
        return self.splits[split]


def _group_ids(scenes: Sequence[Scene]) -> np.ndarray:
    first: dict[tuple, int] = {}
    return np.array([first.setdefault(s.graph_key(), i) for i, s in enumerate(scenes)], dtype=np.int64)


def generate_split(settings: SceneSettings, split: str, held_out: frozenset[Combo]) -> SceneSplit:
    """Scenes, captions and images of one split, from ``seed`` and the split's index only."""
    rng = np.random.default_rng([settings.seed, SCENE_SPLITS.index(split)])
    all_combos = [(c, s) for c in COLOURS for s in SHAPES]
    train_combos = [c for c in all_combos if c not in held_out]
    held = sorted(held_out)
    n = {"train": settings.n_train, "valid": settings.n_valid, "test": settings.n_test,
         "zeroshot": settings.n_zeroshot}[split]
    scenes, captions = [], []
    for _ in range(n):
        if split == "zeroshot":
            scene = sample_scene(rng, 1, all_combos, jitter=settings.jitter)
        else:
            k = int(rng.integers(settings.min_objects, settings.max_objects + 1))
            first = held if (split != "train" and held) else None
            scene = sample_scene(rng, k, train_combos if split == "train" else all_combos, first, settings.jitter)
        scenes.append(scene)
        captions.append(describe_scene(scene, rng, settings.captions_per_image, settings.p_omit_size,
                                       settings.p_omit_colour))
    size = settings.image_size
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i, s in enumerate(scenes):
        images[i] = render_scene(s, size)
    labels = np.array([SHAPES.index(s.objects[0].shape) for s in scenes], dtype=np.int64)
    return SceneSplit(scenes, captions, images, _group_ids(scenes), labels)


def default_cache_dir() -> Path:
    """``$CONTRASTIVE_CACHE/clip`` if the variable is set, else ``~/.cache/contrastive/clip``."""
    base = os.environ.get("CONTRASTIVE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "contrastive") / "clip"


def _save(path: Path, corpus: SceneCorpus) -> None:
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": dataclasses.asdict(corpus.settings),
            "held_out": sorted(corpus.held_out),
            "splits": {k: {"scenes": [s.to_json() for s in v.scenes], "captions": v.captions}
                       for k, v in corpus.splits.items()}}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    for k, v in corpus.splits.items():
        arrays[f"{k}_images"] = v.images

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _load(path: Path, settings: SceneSettings) -> SceneCorpus:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
            raise SceneError(f"{path} is not a scene cache of version {CACHE_VERSION}")
        corpus = SceneCorpus(settings, frozenset(tuple(c) for c in meta["held_out"]), path=path)
        for k, v in meta["splits"].items():
            scenes = [Scene.from_json(s) for s in v["scenes"]]
            labels = np.array([SHAPES.index(s.objects[0].shape) for s in scenes], dtype=np.int64)
            corpus.splits[k] = SceneSplit(scenes, v["captions"], z[f"{k}_images"], _group_ids(scenes), labels)
    return corpus


def build_scene_corpus(settings: SceneSettings | None = None, cache_dir: str | os.PathLike | None = None,
                       use_cache: bool = True,
                       progress: Callable[[str], None] | None = None) -> SceneCorpus:
    """The corpus for ``settings``: read from the cache when present, else generated and cached."""
    settings = settings or SceneSettings()
    settings.validate()
    path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / \
        f"scenes-{settings.fingerprint()}.npz"
    if use_cache and path.is_file():
        try:
            return _load(path, settings)
        except (OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt, never trusted
            log.warning("scene cache %s unreadable (%s); regenerating", path, e)
    held_out = held_out_combos(settings.seed, settings.held_out_per_colour)
    corpus = SceneCorpus(settings, held_out)
    for split in SCENE_SPLITS:
        if progress:
            progress(split)
        corpus.splits[split] = generate_split(settings, split, held_out)
    if use_cache:
        _save(path, corpus)
        corpus.path = path
        log.info("scene corpus written to %s", path)
    return corpus
