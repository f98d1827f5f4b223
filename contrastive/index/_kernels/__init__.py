"""Optional compiled kernels of the exact index, and the BLAS they borrow from torch.

Two pieces, each optional; when one is missing the exact search takes a slower path with the same results:

- :data:`topk`: the C extension ``_topk`` (``_topk.c``, built by ``setup.py`` when a C compiler is present):
  the fused threshold top-k filter of :func:`contrastive.index.exact_topk` on float32 CPU tensors. Without
  it, the torch-op path runs (:func:`fused_available` is False).
- MKL's packed GEMM (``cblas_sgemm_pack_get_size``, ``cblas_sgemm_pack``, ``cblas_sgemm_compute``,
  ``mkl_set_num_threads_local``), looked up by name in the loaded ``libtorch_cpu`` (torch's x86 wheels
  link MKL statically and export these symbols; there is no link-time dependency). It serves the packed
  schedule of the fused path. When a symbol is missing (an ARM or non-MKL build of torch), the lookup
  logs one line and the fused path computes its score blocks with ``torch.mm`` instead
  (:func:`packed_available` is False).
"""
from __future__ import annotations

import ctypes
import glob
import importlib
import logging
import os
import shlex
import shutil
import sysconfig
from types import ModuleType
from typing import Any, Optional

log = logging.getLogger(__name__)

topk: Optional[ModuleType]
try:
    topk = importlib.import_module(f"{__name__}._topk")
except ImportError as e:  # not built: no C compiler at install time, or an install without build_ext
    topk = None
    IMPORT_ERROR: Optional[str] = str(e)
else:
    IMPORT_ERROR = None

#: MKL symbols handed to ``_topk.set_blas``, in its argument order; each entry lists accepted spellings
BLAS_NAMES: tuple[tuple[str, ...], ...] = (
    ("cblas_sgemm_pack_get_size",),
    ("cblas_sgemm_pack",),
    ("cblas_sgemm_compute",),
    ("MKL_Set_Num_Threads_Local", "mkl_set_num_threads_local", "MKL_SET_NUM_THREADS_LOCAL"),
)
#: cached outcome of the packed-GEMM lookup (``{"ok": bool}``); clear it to look again
packed_state: dict[str, bool] = {}


def c_compiler() -> Optional[str]:
    """Path of the C compiler ``setup.py`` would build the extension with (``$CC``, else Python's
    configured ``CC``), or None when it is not on ``PATH``."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    words = shlex.split(cc)
    return shutil.which(words[0]) if words else None


def fused_available() -> bool:
    """Whether the compiled CPU top-k filter is built (``CONTRASTIVE_EXACT_TORCH=1`` disables it)."""
    return topk is not None and os.environ.get("CONTRASTIVE_EXACT_TORCH", "0") != "1"


def _libtorch_cpu() -> list[str]:
    import torch

    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    return sorted(glob.glob(os.path.join(libdir, "libtorch_cpu.*")))


def _blas_exports() -> list[tuple[ctypes.CDLL, list[Any]]]:
    """Each loadable ``libtorch_cpu`` with its :data:`BLAS_NAMES` functions (None where not exported)."""
    out = []
    for path in _libtorch_cpu():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        out.append((lib, [next((getattr(lib, n) for n in names if hasattr(lib, n)), None) for names in BLAS_NAMES]))
    return out


def mkl_packed_gemm() -> Optional[tuple[ctypes.CDLL, list[Any]]]:
    """The loaded ``libtorch_cpu`` as a ``ctypes.CDLL`` and its MKL packed-GEMM functions in
    :data:`BLAS_NAMES` order; None when no ``libtorch_cpu`` exports all of them."""
    return next(((lib, found) for lib, found in _blas_exports() if all(fn is not None for fn in found)), None)


def _missing_blas() -> str:
    """What the lookup lacks, for the log line: the missing symbols, or that no libtorch_cpu loads."""
    exports = _blas_exports()
    if not exports:
        return "no loadable libtorch_cpu"
    return ", ".join(names[0] for names, fn in zip(BLAS_NAMES, exports[0][1]) if fn is None)


def _find_packed_gemm() -> bool:
    """Hand MKL's packed-GEMM function addresses to the C extension; False (and one log line) when that
    cannot be done."""
    if topk is None:
        return False
    try:
        mkl = mkl_packed_gemm()
        if mkl is None:
            log.warning("MKL packed GEMM not found in libtorch_cpu (missing: %s); exact search computes its "
                        "score blocks with torch.mm", _missing_blas())
            return False
        topk.set_blas(*(ctypes.cast(fn, ctypes.c_void_p).value for fn in mkl[1]))
    except Exception as e:  # a foreign build of torch or of the extension: never fail the search over it
        log.warning("MKL packed GEMM unusable (%s: %s); exact search computes its score blocks with torch.mm",
                    type(e).__name__, e)
        return False
    return True


def packed_available() -> bool:
    """Whether the fused path can use the packed-GEMM schedule (MKL found in torch;
    ``CONTRASTIVE_EXACT_PACKED=0`` disables it). The lookup runs once; see :data:`packed_state`."""
    if not fused_available() or os.environ.get("CONTRASTIVE_EXACT_PACKED", "1") == "0":
        return False
    if "ok" not in packed_state:
        packed_state["ok"] = _find_packed_gemm()
    return packed_state["ok"]


__all__ = ["BLAS_NAMES", "IMPORT_ERROR", "c_compiler", "fused_available", "mkl_packed_gemm", "packed_available",
           "packed_state", "topk"]
