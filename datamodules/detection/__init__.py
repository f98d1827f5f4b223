"""Detection data: a COCO-format reader with bad-input repair (:mod:`.coco`), the synthetic vast-vocabulary
default (:mod:`.synthetic`) and the datamodules (:mod:`.datamodule`)."""
from datamodules.detection.coco import (CocoFormatError, CocoReadReport, CocoSplit, frequency_buckets, read_coco,
                                        with_frequency)
from datamodules.detection.datamodule import (DETECTION_DATAMODULES, CocoDetectionDataModule, DetectionDataset,
                                              SyntheticDetectionDataModule, build_detection_datamodule,
                                              collate_detection, detection_transforms)
from datamodules.detection.synthetic import SyntheticSpec, attribute_grid, ensure_synthetic

__all__ = [
    "CocoDetectionDataModule", "CocoFormatError", "CocoReadReport", "CocoSplit", "DETECTION_DATAMODULES",
    "DetectionDataset", "SyntheticDetectionDataModule", "SyntheticSpec", "attribute_grid",
    "build_detection_datamodule", "collate_detection", "detection_transforms", "ensure_synthetic",
    "frequency_buckets", "read_coco", "with_frequency",
]
