"""The installed torch/torchvision pair lies in setup.cfg's ranges, and torchvision's compiled ops run."""
from __future__ import annotations

import configparser
from pathlib import Path

import torch
import torchvision
from packaging.requirements import Requirement
from packaging.version import Version
from torchvision.ops import nms

ROOT = Path(__file__).resolve().parents[1]


def install_requires() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in cfg["options"]["install_requires"].splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {r.name: r for r in reqs}


def public(version: str) -> Version:
    """``2.14.1+cu130`` -> ``2.14.1``: a local build tag does not change the release."""
    return Version(Version(version).public)


def test_torch_pair_is_a_bounded_range_and_installed_within_it():
    reqs = install_requires()
    for name, installed in (("torch", torch.__version__), ("torchvision", torchvision.__version__)):
        spec = reqs[name].specifier
        operators = {s.operator for s in spec}
        assert ">=" in operators and "<" in operators and "==" not in operators, f"{name}: {spec} is not a range"
        assert spec.contains(public(installed)), f"installed {name} {installed} is outside setup.cfg's {spec}"


def test_torch_and_torchvision_bounds_name_the_same_series():
    """torchvision 0.N is built for torch 2.(N - 15): the two ranges must be raised together."""
    reqs = install_requires()
    for op in (">=", "<"):
        torch_bound, vision_bound = (next(Version(s.version) for s in reqs[n].specifier if s.operator == op)
                                     for n in ("torch", "torchvision"))
        assert (torch_bound.major, torch_bound.minor + 15) == (vision_bound.major + 2, vision_bound.minor), op


def test_torchvision_compiled_nms_runs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    # the compiled op itself, not a Python fallback: it is registered with the dispatcher
    assert torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


def test_faiss_is_importable_from_the_cpu_extra():
    import faiss

    index = faiss.IndexFlatIP(4)
    index.add(torch.eye(4).numpy())
    _, ids = index.search(torch.eye(4)[:1].numpy(), 1)
    assert ids[0, 0] == 0
