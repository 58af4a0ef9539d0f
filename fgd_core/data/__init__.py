"""Detection data: the procedural shapes dataset and COCO-format datasets and loaders."""

from fgd_core.data.coco import (
    Batch,
    CocoDetection,
    GroupedBatchSampler,
    Target,
    aspect_ratio_groups,
    build_eval_loader,
    build_train_loader,
    collate_fn,
    iterate_forever,
    iterate_from,
    segmentation_to_mask,
)
from fgd_core.data.errors import DatasetError
from fgd_core.data.shapes import (
    SHAPE_NAMES,
    ShapesConfig,
    ShapesDataset,
    generate_shapes,
    load_shapes,
    render_sample,
)

__all__ = [
    "SHAPE_NAMES",
    "Batch",
    "CocoDetection",
    "DatasetError",
    "GroupedBatchSampler",
    "ShapesConfig",
    "ShapesDataset",
    "Target",
    "aspect_ratio_groups",
    "build_eval_loader",
    "build_train_loader",
    "collate_fn",
    "generate_shapes",
    "iterate_forever",
    "iterate_from",
    "load_shapes",
    "render_sample",
    "segmentation_to_mask",
]
