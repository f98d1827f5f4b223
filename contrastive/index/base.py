"""The kNN index interface shared by the exact (torch) and FAISS backends.

An :class:`Index` holds ``N`` vectors of size ``dim`` whose ids are their insertion order ``0..N-1``.
``search(queries (Q, dim), k)`` returns ``(scores (Q, k) float32, ids (Q, k) int64)`` sorted by
descending score, on the CPU. Two metrics:

- ``"ip"``: inner product ``<q, x>`` (what a dual encoder trained with a dot-product loss uses);
- ``"cosine"``: vectors are L2-normalised on :meth:`Index.add` and on :meth:`Index.search`, so the score
  is the cosine similarity. A zero vector cannot be normalised and is rejected.

Every index is saved as two files written atomically (temp file + ``os.replace``): the payload at
``path`` and a JSON sidecar ``path + ".json"`` naming the backend, metric and dim. :meth:`Index.load`
reads the sidecar first, so it can dispatch to the right backend and check ``expected_dim`` before
reading a possibly large payload.
"""
from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]

METRICS = ("ip", "cosine")
FORMAT = "contrastive.index"
FORMAT_VERSION = 1


class IndexInputError(ValueError):
    """Bad vectors or arguments given to an index (dim, dtype, non-finite values, ``k``)."""


from contrastive.io import atomic_write  # noqa: E402,F401  (re-exported for the backends)


class IndexFileError(ValueError):
    """A saved index that cannot be loaded: missing or corrupt file, or a dim other than expected."""


def sidecar_path(path: Union[str, os.PathLike]) -> Path:
    """The JSON metadata file that accompanies a saved index at ``path``."""
    return Path(str(path) + ".json")




def write_sidecar(path: Union[str, os.PathLike], meta: dict[str, Any]) -> None:
    """Atomically write the JSON sidecar of the index saved at ``path``."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **meta}

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)

    atomic_write(sidecar_path(path), write)


def read_sidecar(path: Union[str, os.PathLike], expected_dim: Optional[int] = None) -> dict[str, Any]:
    """Read and check the sidecar of ``path``; raise :class:`IndexFileError` naming the file on any problem."""
    side = sidecar_path(path)
    if not Path(path).exists():
        raise IndexFileError(f"cannot load index: {path} does not exist")
    if not side.exists():
        raise IndexFileError(f"cannot load index {path}: its metadata file {side} is missing")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise IndexFileError(f"cannot load index {path}: metadata file {side} is corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "dim" not in meta or "backend" not in meta:
        raise IndexFileError(f"cannot load index {path}: {side} is not a {FORMAT} metadata file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise IndexFileError(
            f"cannot load index {path}: format version {meta['version']} is newer than this library's {FORMAT_VERSION}"
        )
    check_dim(path, int(meta["dim"]), expected_dim)
    return meta


def check_dim(path: Union[str, os.PathLike], dim: int, expected_dim: Optional[int]) -> None:
    """Raise :class:`IndexFileError` naming ``path`` and both dims when ``dim != expected_dim``."""
    if expected_dim is not None and int(dim) != int(expected_dim):
        raise IndexFileError(
            f"index file {path} holds vectors of dim {dim}, but dim {expected_dim} was expected "
            "(was it built with another encoder or projection size?)"
        )


def check_size(path: Union[str, os.PathLike], size: int, meta: dict[str, Any]) -> None:
    """Raise :class:`IndexFileError` when the payload holds another number of vectors than the sidecar says
    (the two files come from different saves)."""
    if "size" in meta and int(meta["size"]) != int(size):
        raise IndexFileError(
            f"index file {path} holds {size} vectors but its metadata says {meta['size']}: "
            "the file and its .json sidecar come from different saves"
        )


def n_rows(x: ArrayLike, name: str) -> int:
    """Number of vectors in ``x`` (``(n, dim)`` or a single ``(dim,)`` vector); rejects other types."""
    if not isinstance(x, (Tensor, np.ndarray)):
        raise IndexInputError(f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}")
    return int(x.shape[0]) if x.ndim == 2 else 1


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise IndexInputError(f"metric must be one of {METRICS}; got {metric!r}")
    return metric


def to_float_tensor(x: ArrayLike, dim: int, name: str, device: Optional[torch.device] = None) -> Tensor:
    """``x`` as a float32 ``(n, dim)`` tensor on ``device`` (CPU when None), after checking its shape.

    A single vector ``(dim,)`` is accepted and viewed as ``(1, dim)``.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        raise IndexInputError(f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise IndexInputError(f"{name} must be 2-D (n, {dim}); got shape {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise IndexInputError(f"{name} have dim {x.shape[1]}, but the index has dim {dim}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise IndexInputError(f"{name} must be numeric; got {x.dtype}")
    x = x.detach().to(device=device if device is not None else x.device, dtype=torch.float32)
    return x.contiguous()


def check_finite(x: Tensor, name: str, offset: int = 0) -> None:
    """Raise :class:`IndexInputError` listing the first rows of ``x`` (2-D) that hold NaN or inf.

    A row holding NaN or inf always has a non-finite sum, so only rows whose sum is not finite (those,
    and finite rows whose sum overflows) are checked element by element: one reduction over ``x``
    instead of a full boolean copy (``torch.isfinite(x).all()`` cost 8% of an exact search).
    """
    suspects = (~torch.isfinite(x.sum(dim=1))).nonzero().flatten()
    if suspects.numel():
        bad_rows = suspects[(~torch.isfinite(x[suspects])).any(dim=1)]
        if bad_rows.numel():
            bad = (bad_rows[:5] + offset).tolist()
            raise IndexInputError(f"{name} contain NaN or infinite values (rows {bad} ...)")


def l2_normalise(x: Tensor, name: str, offset: int = 0) -> Tensor:
    """Rows of ``x`` divided by their L2 norm; zero rows are rejected (their cosine is undefined)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if (norms == 0).any():
        bad = ((norms.flatten() == 0).nonzero().flatten()[:5] + offset).tolist()
        raise IndexInputError(f"metric='cosine' cannot normalise zero vectors in {name} (rows {bad} ...)")
    return x / norms


def check_k(k: int, size: int, allow_fewer: bool) -> int:
    """Validate ``k`` against the index size; returns the number of neighbours to return."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexInputError(f"k must be a positive integer; got {k!r}")
    if size == 0:
        raise IndexInputError("cannot search an empty index: add() vectors first")
    if k > size:
        if allow_fewer:
            return size
        raise IndexInputError(
            f"k={k} is larger than the index size {size}; lower k or pass allow_fewer=True to get {size} results"
        )
    return int(k)


class Index(abc.ABC):
    """A kNN index over ``dim``-dimensional vectors, ids ``0..N-1`` in insertion order.

    Args:
        dim: vector size ``d``.
        metric: ``"ip"`` (inner product) or ``"cosine"`` (vectors L2-normalised on add and search).
    """

    #: short backend name written to the sidecar and used by :meth:`load` to dispatch
    backend: str = ""

    def __init__(self, dim: int, metric: str = "ip") -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise IndexInputError(f"dim must be a positive integer; got {dim!r}")
        self.dim = int(dim)
        self.metric = check_metric(metric)

    # -- vectors ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def add(self, x: ArrayLike) -> None:
        """Append ``x`` ``(n, dim)``; the new vectors get ids ``len(self) .. len(self) + n - 1``."""

    @abc.abstractmethod
    def search(self, queries: ArrayLike, k: int, allow_fewer: bool = False) -> tuple[Tensor, Tensor]:
        """Top-``k`` neighbours of each query.

        Args:
            queries: ``(Q, dim)`` float vectors.
            k: neighbours per query; ``k > len(self)`` raises unless ``allow_fewer`` (then ``len(self)``).

        Returns:
            ``scores`` ``(Q, k)`` float32 and ``ids`` ``(Q, k)`` int64, CPU tensors, best first.
        """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of vectors in the index."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Remove all vectors (and any trained state that depends on them)."""

    # -- persistence --------------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the index to ``path`` plus the sidecar ``path + '.json'``, both atomically."""

    @classmethod
    def load(cls, path: Union[str, os.PathLike], expected_dim: Optional[int] = None, **overrides: Any) -> "Index":
        """Load an index saved by :meth:`save`.

        With ``expected_dim``, a different dim raises :class:`IndexFileError` naming the file and both
        dims. Called on :class:`Index` itself it dispatches on the backend named in the sidecar.
        ``overrides`` are constructor arguments that are not stored (``device=`` for the exact index,
        ``use_gpu=``/``gpu_ids=`` for FAISS) or that should change (``nprobe=``, ``chunk_size=``).
        """
        meta = read_sidecar(path, expected_dim)
        backend = meta["backend"]
        if cls.backend and cls.backend != backend:
            raise IndexFileError(f"index file {path} was saved by the {backend!r} backend, not {cls.backend!r}")
        target = _BACKENDS.get(backend)
        if target is None:
            _import_backends()
            target = _BACKENDS.get(backend)
        if target is None:
            raise IndexFileError(f"index file {path} names an unknown backend {backend!r}")
        return target._load(path, meta, **overrides)

    @classmethod
    @abc.abstractmethod
    def _load(cls, path: Union[str, os.PathLike], meta: dict[str, Any], **overrides: Any) -> "Index":
        """Backend-specific loading, after the sidecar was read and checked."""

    # -- helpers for subclasses ---------------------------------------------------------------------
    def _prepare(self, x: ArrayLike, name: str, device: Optional[torch.device] = None, offset: int = 0) -> Tensor:
        """Validated float32 ``(n, dim)`` tensor, normalised under ``metric='cosine'``."""
        t = to_float_tensor(x, self.dim, name, device)
        check_finite(t, name, offset)
        if self.metric == "cosine":
            t = l2_normalise(t, name, offset)
        return t

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, size={len(self)})"


_BACKENDS: dict[str, type[Index]] = {}


def register_backend(cls: type[Index]) -> type[Index]:
    """Record ``cls`` under ``cls.backend`` so :meth:`Index.load` can find it."""
    _BACKENDS[cls.backend] = cls
    return cls


def _import_backends() -> None:
    import contrastive.index  # noqa: F401  (imports both backends, which register themselves)
