"""The torchvision detectors' forward, split into transform -> backbone -> heads.

`prepare` + `backbone_features` + `head_losses` (train mode) returns exactly what
``model(images, targets)`` returns, and `prepare` + `backbone_features` + `head_detections`
(eval mode) exactly what ``model(images)`` returns, for RetinaNet, FCOS, Faster and Mask R-CNN
(steps reproduced from torchvision 0.29's retinanet.py, fcos.py and generalized_rcnn.py). In
between, the caller holds the FPN features and the transformed targets in one frame: the
distiller feeds the same `Prepared` batch to the teacher's backbone too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

Targets = list[dict[str, Tensor]]


@dataclass
class Prepared:
    """One batch after the detector's transform (normalise, resize, pad)."""

    image_list: ImageList  # .tensors (B, 3, H_pad, W_pad); .image_sizes [(h, w)] resized, unpadded
    # Transformed targets or None: boxes [x1, y1, x2, y2] in pixels of the resized image, which is
    # the padded batch's frame too (images sit at the top-left of the padded tensor).
    targets: Targets | None
    original_image_sizes: list[tuple[int, int]]  # (h, w) of each input image before the resize


def _check_model(model: nn.Module) -> GeneralizedRCNN | RetinaNet | FCOS:
    if not isinstance(model, GeneralizedRCNN | RetinaNet | FCOS):
        raise TypeError(
            f"expected a torchvision GeneralizedRCNN, RetinaNet or FCOS, got {type(model).__name__}"
        )
    return model


def _sub(model: nn.Module, name: str) -> nn.Module:
    """`model.<name>` as a Module (torchvision's detectors are not typed)."""
    sub = getattr(model, name)
    assert isinstance(sub, nn.Module)
    return sub


def _transform(model: nn.Module) -> GeneralizedRCNNTransform:
    transform = model.transform
    assert isinstance(transform, GeneralizedRCNNTransform)
    return transform


def prepare(model: nn.Module, images: list[Tensor], targets: Targets | None = None) -> Prepared:
    """Run `model.transform` as the model's forward does, with the same checks on targets.

    Args:
        images: (3, H_i, W_i) float images in [0, 1].
        targets: per image "boxes" (N, 4) [x1, y1, x2, y2] in input image pixels, "labels" (N,)
            in 1..K, and "masks" (N, H_i, W_i) for Mask R-CNN; required in train mode.
    """
    model = _check_model(model)
    if model.training:
        if targets is None:
            torch._assert(False, "targets should not be none when in training mode")
        else:
            for target in targets:
                boxes = target["boxes"]
                torch._assert(
                    isinstance(boxes, torch.Tensor), "Expected target boxes to be of type Tensor."
                )
                torch._assert(
                    len(boxes.shape) == 2 and boxes.shape[-1] == 4,
                    f"Expected target boxes to be a tensor of shape [N, 4], got {boxes.shape}.",
                )
    original_image_sizes: list[tuple[int, int]] = []
    for img in images:
        val = img.shape[-2:]
        torch._assert(
            len(val) == 2,
            "expecting the last two dimensions of the Tensor to be H and W instead got "
            f"{img.shape[-2:]}",
        )
        original_image_sizes.append((int(val[0]), int(val[1])))
    image_list, new_targets = _transform(model)(images, targets)
    if new_targets is not None:
        for target_idx, target in enumerate(new_targets):
            boxes = target["boxes"]
            degenerate = boxes[:, 2:] <= boxes[:, :2]
            if degenerate.any():
                bb_idx = torch.where(degenerate.any(dim=1))[0][0]
                torch._assert(
                    False,
                    "All bounding boxes should have positive height and width."
                    f" Found invalid box {boxes[bb_idx].tolist()} for target at index {target_idx}.",
                )
    return Prepared(image_list, new_targets, original_image_sizes)


def backbone_features(model: nn.Module, prepared: Prepared) -> OrderedDict[str, Tensor]:
    """FPN outputs of `model.backbone` on the prepared batch, keyed as torchvision names them.

    Returns:
        key ("0", "1", ..., "p6", "p7" or "pool") -> (B, C, H_l, W_l) with H_l = ceil(H_pad / stride).
    """
    return pyramid(model, prepared.image_list.tensors)


def pyramid(model: nn.Module, tensors: Tensor) -> OrderedDict[str, Tensor]:
    """FPN outputs of `model.backbone` on a batched input tensor (B, 3, H_pad, W_pad)."""
    backbone = model.backbone
    assert isinstance(backbone, nn.Module)
    features = backbone(tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])  # (B, C, H, W)
    return OrderedDict(features)


def head_losses(
    model: nn.Module, prepared: Prepared, features: OrderedDict[str, Tensor]
) -> dict[str, Tensor]:
    """The detector's own loss dict (train mode), as ``model(images, targets)`` returns it."""
    model = _check_model(model)
    if not model.training:
        raise ValueError("head_losses needs the model in train mode (call model.train())")
    if prepared.targets is None:
        raise ValueError("head_losses needs targets: call prepare(model, images, targets)")
    targets = prepared.targets
    if isinstance(model, GeneralizedRCNN):
        proposals, proposal_losses = model.rpn(prepared.image_list, features, targets)
        _, detector_losses = model.roi_heads(
            features, proposals, prepared.image_list.image_sizes, targets
        )
        losses: dict[str, Tensor] = {}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        return losses
    feats = list(features.values())  # [(B, C, H_l, W_l)]
    head_outputs = _sub(model, "head")(feats)
    anchors = _sub(model, "anchor_generator")(prepared.image_list, feats)
    if isinstance(model, FCOS):
        num_anchors_per_level = [x.size(2) * x.size(3) for x in feats]
        return model.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)
    retinanet: RetinaNet = model
    return retinanet.compute_loss(targets, head_outputs, anchors)


def head_detections(
    model: nn.Module, prepared: Prepared, features: OrderedDict[str, Tensor]
) -> list[dict[str, Tensor]]:
    """Postprocessed detections (eval mode) in ORIGINAL image pixels, as ``model(images)`` returns.

    Per image: "boxes" (N, 4) [x1, y1, x2, y2], "scores" (N,), "labels" (N,) and for Mask R-CNN
    "masks" (N, 1, H_i, W_i) probabilities.
    """
    model = _check_model(model)
    if model.training:
        raise ValueError("head_detections needs the model in eval mode (call model.eval())")
    image_sizes = prepared.image_list.image_sizes
    transform = _transform(model)
    if isinstance(model, GeneralizedRCNN):
        proposals, _ = model.rpn(prepared.image_list, features, prepared.targets)
        detections, _ = model.roi_heads(features, proposals, image_sizes, prepared.targets)
        return transform.postprocess(detections, image_sizes, prepared.original_image_sizes)
    feats = list(features.values())  # [(B, C, H_l, W_l)]
    head_outputs = _sub(model, "head")(feats)  # per key (B, sum_l H_l*W_l*A, ...)
    anchors = _sub(model, "anchor_generator")(prepared.image_list, feats)
    num_per_level = [x.size(2) * x.size(3) for x in feats]
    if isinstance(model, RetinaNet):
        num_anchors = head_outputs["cls_logits"].size(1) // sum(num_per_level)
        num_per_level = [hw * num_anchors for hw in num_per_level]
    split_outputs = {k: list(v.split(num_per_level, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(num_per_level)) for a in anchors]
    one_stage: RetinaNet | FCOS = model
    detections = one_stage.postprocess_detections(split_outputs, split_anchors, image_sizes)
    return transform.postprocess(detections, image_sizes, prepared.original_image_sizes)
