"""Synthetic vast-vocabulary detection scenes, written as COCO JSON + PNG images (the embedded default).

Each leaf category is an attribute product ``shape x colour x texture`` (up to 10 x 10 x 8 = 800); the
vocabulary size picks the smallest balanced grid holding it and a seeded subset of its cells. The
hierarchy is the natural one, ``shape -> shape+colour -> shape+colour+texture``: the inner nodes are
categories too (``parent`` ids in the JSON, ``level`` 0/1/2), so a V3Det-style tree is available to the
hierarchy options. Objects are labelled with leaves; with ``coarse_fraction > 0`` that share of objects is
labelled with its shape+colour parent instead (as in vocabularies where a coarse name is also valid).

Leaf frequencies follow a Zipf law over a seeded ranking of the leaves (``p_r ~ r^-s``); every leaf has at
least ``min_train_instances`` objects in train and ``min_eval_instances`` in val and in test, so rare
categories exist in every split. The output is deterministic for a given set of arguments, generated once
into ``<cache_dir>/synthetic_<hash>/`` (built in a temporary folder and renamed into place) and then read
back through :func:`datamodules.detection.coco.read_coco` like a user's dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

log = logging.getLogger("datamodules.detection")

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hexagon", "star", "bar", "trapezoid")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 225, 40),
           "magenta": (225, 50, 220), "cyan": (40, 220, 225), "orange": (245, 140, 20), "purple": (130, 60, 200),
           "white": (245, 245, 245), "brown": (140, 90, 40)}
TEXTURES = ("solid", "hstripes", "vstripes", "checker", "dots", "outline", "grid", "crosshatch")
MAX_VOCABULARY = len(SHAPES) * len(COLOURS) * len(TEXTURES)
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the generated data (its hash names the cache folder)."""

    num_categories: int = 50
    image_size: int = 64
    train_images: int = 2000
    val_images: int = 200
    test_images: int = 400
    max_objects: int = 4
    min_object_size: float = 0.22
    max_object_size: float = 0.5
    zipf_exponent: float = 1.2
    min_train_instances: int = 2
    min_eval_instances: int = 1
    coarse_fraction: float = 0.0
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.num_categories <= MAX_VOCABULARY:
            raise ValueError(f"num_categories must be in 1..{MAX_VOCABULARY}; got {self.num_categories}")
        if self.image_size < 32 or self.max_objects < 1 or not 0 < self.min_object_size <= self.max_object_size < 1:
            raise ValueError(f"bad synthetic scene sizes: {self}")
        if not 0.0 <= self.coarse_fraction <= 1.0:
            raise ValueError(f"coarse_fraction must be in [0, 1]; got {self.coarse_fraction}")

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def attribute_grid(num_categories: int) -> tuple[int, int, int]:
    """The smallest balanced ``(shapes, colours, textures)`` grid with at least ``num_categories`` cells."""
    dims, caps = [1, 1, 1], [len(SHAPES), len(COLOURS), len(TEXTURES)]
    i = 0
    while dims[0] * dims[1] * dims[2] < num_categories:
        if dims[i % 3] < caps[i % 3]:
            dims[i % 3] += 1
        i += 1
    return dims[0], dims[1], dims[2]


def build_categories(spec: SyntheticSpec) -> tuple[list[dict], list[int], np.ndarray]:
    """COCO categories (leaves and inner nodes), the leaf category ids, and the leaf Zipf probabilities
    (aligned with the leaf ids)."""
    rng = np.random.default_rng(spec.seed)
    ns, nc, nt = attribute_grid(spec.num_categories)
    cells = [(s, c, t) for s in range(ns) for c in range(nc) for t in range(nt)]
    chosen = sorted(rng.permutation(len(cells))[:spec.num_categories].tolist())
    leaves = [cells[i] for i in chosen]
    colour_names = list(COLOURS)
    cats: list[dict] = []
    ids: dict[tuple, int] = {}

    def add(key: tuple, name: str, parent: Optional[int], level: int) -> int:
        if key not in ids:
            ids[key] = len(cats) + 1
            cats.append({"id": ids[key], "name": name, "parent": parent, "level": level})
        return ids[key]

    leaf_ids = []
    for s, c, t in leaves:
        p0 = add((s,), SHAPES[s], None, 0)
        p1 = add((s, c), f"{colour_names[c]} {SHAPES[s]}", p0, 1)
        leaf_ids.append(add((s, c, t), f"{TEXTURES[t]} {colour_names[c]} {SHAPES[s]}", p1, 2))
    ranks = rng.permutation(len(leaves)) + 1
    probs = ranks.astype(np.float64) ** -spec.zipf_exponent
    return cats, leaf_ids, probs / probs.sum()


def shape_mask(shape: str, size: int) -> np.ndarray:
    """``(size, size)`` bool mask of ``shape`` (all shapes are symmetric under a horizontal flip)."""
    g = (np.arange(size) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(g, g, indexing="ij")
    r, th = np.hypot(u, v), np.arctan2(v, u)
    masks = {
        "circle": r <= 0.95,
        "square": (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
        "triangle": (np.abs(u) <= (v + 0.95) / 2) & (v <= 0.95),
        "diamond": np.abs(u) + np.abs(v) <= 0.98,
        "cross": ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)) & (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95),
        "ring": (r <= 0.95) & (r >= 0.55),
        "hexagon": (np.abs(v) <= 0.82) & (np.abs(u) + 0.55 * np.abs(v) <= 0.95),
        "star": r <= 0.55 + 0.4 * np.cos(5 * (th + np.pi / 2)),
        "bar": (np.abs(v) <= 0.45) & (np.abs(u) <= 0.95),
        "trapezoid": (np.abs(v) <= 0.7) & (np.abs(u) <= 0.55 + 0.35 * (v + 0.7) / 1.4),
    }
    return masks[shape]


def texture_mask(texture: str, size: int, mask: np.ndarray) -> np.ndarray:
    """``(size, size)`` bool: pixels of the object drawn in full colour (the rest is darkened)."""
    y, x = np.mgrid[:size, :size]
    pat = {
        "solid": np.ones_like(mask),
        "hstripes": (y // 2) % 2 == 0,
        "vstripes": (x // 2) % 2 == 0,
        "checker": ((x // 3) + (y // 3)) % 2 == 0,
        "dots": ((x % 4) < 2) & ((y % 4) < 2),
        "grid": (x % 4 == 0) | (y % 4 == 0),
        "crosshatch": ((x + y) % 4 == 0) | ((x - y) % 4 == 0),
    }
    if texture == "outline":
        inner = mask.copy()
        inner[1:-1, 1:-1] = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
        return mask & ~(inner & np.roll(inner, 1, 0) & np.roll(inner, -1, 0) & np.roll(inner, 1, 1) & np.roll(inner, -1, 1))
    return pat[texture] & mask


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _instance_labels(rng: np.random.Generator, probs: np.ndarray, total: int, minimum: int) -> np.ndarray:
    """``total`` leaf indices: ``minimum`` of each leaf, the rest drawn from ``probs``; shuffled."""
    base = np.repeat(np.arange(len(probs)), minimum)
    extra = rng.choice(len(probs), size=max(0, total - base.size), p=probs)
    return rng.permutation(np.concatenate([base, extra]))


def render_split(spec: SyntheticSpec, split: str, num_images: int, cats: list[dict], leaf_ids: list[int],
                 probs: np.ndarray, out_dir: Path, first_ann_id: int) -> dict[str, Any]:
    """Draw ``num_images`` scenes of ``split`` into ``out_dir/images/<split>/`` and return the COCO dict."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split) + 1])
    by_id = {c["id"]: c for c in cats}
    n_objects = rng.integers(1, spec.max_objects + 1, size=num_images)
    minimum = spec.min_train_instances if split == "train" else spec.min_eval_instances
    labels = _instance_labels(rng, probs, int(n_objects.sum()), minimum)
    # more instances than slots (large vocabularies): add images of the remaining objects
    while labels.size > n_objects.sum():
        n_objects = np.append(n_objects, rng.integers(1, spec.max_objects + 1))
    colour_names, S = list(COLOURS), spec.image_size
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, cursor, ann_id = [], [], 0, first_ann_id
    for i, n in enumerate(n_objects):
        todo = labels[cursor:cursor + n]
        cursor += n
        base = rng.integers(0, 70, size=3)
        canvas = np.clip(base[None, None, :] + rng.normal(0, 12, size=(S, S, 3)), 0, 255)
        placed: list[list[float]] = []
        for leaf in todo:
            cat = by_id[leaf_ids[leaf]]
            shape, colour, texture = _attributes(cat["name"])
            for _ in range(30):
                size = int(rng.uniform(spec.min_object_size, spec.max_object_size) * S)
                x0, y0 = (int(v) for v in rng.integers(0, S - size + 1, size=2))
                box = [x0, y0, x0 + size, y0 + size]
                if all(_iou(box, p) < 0.1 for p in placed):
                    break
            else:
                continue
            m = shape_mask(shape, size)
            t = texture_mask(texture, size, m)
            rgb = np.array(COLOURS[colour], dtype=np.float64)
            region = canvas[y0:y0 + size, x0:x0 + size]
            region[m] = rgb * 0.35
            region[t] = rgb
            ys, xs = np.nonzero(m)
            bx0, by0, bx1, by1 = x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
            placed.append([bx0, by0, bx1, by1])
            cat_id = cat["id"]
            if spec.coarse_fraction and rng.random() < spec.coarse_fraction:
                cat_id = cat["parent"]
            anns.append({"id": ann_id, "image_id": i + 1, "category_id": int(cat_id), "iscrowd": 0,
                         "bbox": [float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)],
                         "area": float(m.sum())})
            ann_id += 1
        name = f"{split}_{i + 1:06d}.png"
        Image.fromarray(canvas.astype(np.uint8)).save(img_dir / name, optimize=False, compress_level=1)
        images.append({"id": i + 1, "file_name": name, "width": S, "height": S})
    return {"info": {"description": f"synthetic vast-vocabulary scenes ({split})", "spec": asdict(spec)},
            "images": images, "annotations": anns, "categories": cats}


def _attributes(name: str) -> tuple[str, str, str]:
    texture, colour, shape = name.split(" ")
    return shape, colour, texture


def default_cache_dir() -> Path:
    """``$CONTRASTIVE_CACHE/detection`` if the variable is set, else ``~/.cache/contrastive/detection``."""
    base = os.environ.get("CONTRASTIVE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "contrastive") / "detection"


def ensure_synthetic(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``{train,val,test}.json`` and ``images/<split>/``, generated on first use.

    Generation happens in a temporary sibling folder renamed into place, so a crash never leaves a
    partial dataset and concurrent callers end up with one complete copy.
    """
    spec.check()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"synthetic_{spec.key()}"
    if (final / "test.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        cats, leaf_ids, probs = build_categories(spec)
        ann_id = 1
        for split, n in zip(SPLITS, (spec.train_images, spec.val_images, spec.test_images)):
            coco = render_split(spec, split, n, cats, leaf_ids, probs, tmp, ann_id)
            ann_id += len(coco["annotations"])
            (tmp / f"{split}.json").write_text(json.dumps(coco))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / "test.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated synthetic detection data (%d categories) in %s", spec.num_categories, final)
    return final

