"""The pinned torch/torchvision pair imports together and torchvision's compiled ops run."""
import torch
import torchvision
from torchvision.ops import nms


def test_torchvision_compiled_nms_runs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert torch.__version__.split("+")[0] == "2.14.1" and torchvision.__version__.startswith("0.29")


def test_faiss_is_importable_from_the_cpu_extra():
    import faiss

    index = faiss.IndexFlatIP(4)
    index.add(torch.eye(4).numpy())
    _, ids = index.search(torch.eye(4)[:1].numpy(), 1)
    assert ids[0, 0] == 0
