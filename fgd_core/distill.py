"""Teacher + student + FGD in one module, and the plain detector wrapper for baselines.

Both return a dict of named loss terms from `forward(images, targets)`; the training loop sums
them and logs each.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fgd_core.detectors import (
    Prepared,
    backbone_features,
    head_losses,
    inherit_weights,
    level_info,
    prepare,
    pyramid,
)
from fgd_core.losses import MultiLevelFGD
from fgd_core.teacher_cache import TeacherFeatureCache, entry_ids, own_frame
from fgd_core.training.config import FGDConfig

Targets = list[dict[str, Tensor]]


@dataclass
class DistillBatch:
    """One batch seen by teacher and student through the student's transform."""

    detection: dict[str, Tensor]  # the student's own detection loss terms
    student: dict[str, Tensor]  # level name -> (B, Cs, H_l, W_l)
    teacher: dict[str, Tensor]  # level name -> (B, C, H_l, W_l), no grad
    boxes: list[Tensor]  # per image (N_i, 4) [x1, y1, x2, y2] in padded-batch pixels
    input_hw: tuple[int, int]  # (H_in, W_in) of the padded batch
    image_sizes: list[tuple[int, int]]  # resized, unpadded (h, w) of each image


class DetectorModule(nn.Module):
    """A detector trained on its own (teacher jobs and baseline students)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.student = model

    def forward(self, images: Sequence[Tensor], targets: Targets) -> dict[str, Tensor]:
        prepared = prepare(self.student, list(images), targets)
        return head_losses(self.student, prepared, backbone_features(self.student, prepared))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.student.parameters() if p.requires_grad)

    def checkpoint_state(self) -> dict[str, dict[str, Tensor]]:
        return {"model": self.student.state_dict()}

    def load_checkpoint_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.student.load_state_dict(state["model"])


def matched_levels(student: nn.Module, teacher: nn.Module, names: Sequence[str] | None) -> dict:
    """Map distilled level names to (student key, teacher key), checking strides agree.

    Args:
        names: level names ("P3", ...) to distill; None = every level the two share that is
            distilled by default (all but the pooled one).

    Returns:
        OrderedDict name -> (student feature key, teacher feature key).
    """
    s_info = {info.name: (key, info) for key, info in level_info(student).items()}
    t_info = {info.name: (key, info) for key, info in level_info(teacher).items()}
    if names is None:
        chosen = [n for n, (_, info) in s_info.items() if info.distill_by_default]
        missing = [n for n in chosen if n not in t_info]
        if missing:
            raise ValueError(
                f"the teacher has no level {missing}; teacher levels {list(t_info)}, "
                f"student levels {list(s_info)}"
            )
    else:
        chosen = list(names)
        for role, info in (("student", s_info), ("teacher", t_info)):
            missing = [n for n in chosen if n not in info]
            if missing:
                raise ValueError(f"the {role} has no level {missing}; it has {list(info)}")
    out: OrderedDict[str, tuple[str, str]] = OrderedDict()
    for name in chosen:
        (s_key, s_lvl), (t_key, t_lvl) = s_info[name], t_info[name]
        if s_lvl.stride != t_lvl.stride:
            raise ValueError(
                f"level {name}: student stride {s_lvl.stride} != teacher stride {t_lvl.stride}"
            )
        out[name] = (s_key, t_key)
    if not out:
        raise ValueError("no level to distill")
    return out


def fpn_channels(model: nn.Module) -> int:
    backbone = model.backbone
    channels = getattr(backbone, "out_channels", None)
    if not isinstance(channels, int):
        raise ValueError("cannot read the FPN width (backbone.out_channels) of the detector")
    return channels


class Distiller(nn.Module):
    """A frozen teacher, a student and one FGD loss per distilled level.

    The teacher is frozen three ways: `requires_grad_(False)`, kept in eval mode even when this
    module is put in train mode, and run under `torch.no_grad()`. The student's transform runs
    once per batch and the teacher's backbone sees that same padded tensor, so both feature
    pyramids and the transformed boxes share one frame.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: FGDConfig) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.config = config
        self.levels = matched_levels(student, teacher, config.levels)
        s_tf: Any = student.transform
        t_tf: Any = teacher.transform
        same = (
            tuple(s_tf.min_size) == tuple(t_tf.min_size)
            and s_tf.max_size == t_tf.max_size
            and list(s_tf.image_mean) == list(t_tf.image_mean)
            and list(s_tf.image_std) == list(t_tf.image_std)
        )
        if not same:
            raise ValueError(
                "teacher and student must see the same batched input: their min_size, max_size "
                "and normalisation differ"
            )
        # Set by the job when `fgd.teacher_cache` is on (see fgd_core.teacher_cache).
        self.teacher_cache: TeacherFeatureCache | None = None
        self.inherited: list[str] = inherit_weights(student, teacher) if config.inherit else []
        self.fgd = MultiLevelFGD(
            list(self.levels),
            fpn_channels(student),
            fpn_channels(teacher),
            temp=config.temp,
            alpha=config.alpha,
            beta=config.beta,
            gamma=config.gamma,
            lambda_=config.lambda_,
            box_frame=config.box_frame,
            compile=config.compile,
        )

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def features(self, images: Sequence[Tensor], targets: Targets) -> DistillBatch:
        """Student detection losses and both pyramids of one batch, in one frame."""
        prepared = prepare(self.student, list(images), targets)
        s_feats = backbone_features(self.student, prepared)
        detection = head_losses(self.student, prepared, s_feats)
        s_levels = {name: s_feats[s_key] for name, (s_key, _) in self.levels.items()}
        with torch.no_grad():
            t_levels = self._teacher_levels(prepared, targets, s_levels)
        for name in self.levels:
            if s_levels[name].shape[-2:] != t_levels[name].shape[-2:]:
                raise ValueError(
                    f"level {name}: student map {tuple(s_levels[name].shape[-2:])} != teacher "
                    f"map {tuple(t_levels[name].shape[-2:])}"
                )
        assert prepared.targets is not None
        h_in, w_in = prepared.image_list.tensors.shape[-2:]
        return DistillBatch(
            detection=detection,
            student=s_levels,
            teacher=t_levels,
            boxes=[t["boxes"] for t in prepared.targets],
            input_hw=(int(h_in), int(w_in)),
            image_sizes=[(int(h), int(w)) for h, w in prepared.image_list.image_sizes],
        )

    def _live_teacher(self, tensors: Tensor) -> dict[str, Tensor]:
        feats = pyramid(self.teacher, tensors)
        return {name: feats[t_key] for name, (_, t_key) in self.levels.items()}

    def _in_own_frames(self, prepared: Prepared) -> bool:
        """Whether the padded batch is each image's own padded frame (cache entries apply)."""
        divisible = int(getattr(self.student.transform, "size_divisible", 1))
        frame = tuple(prepared.image_list.tensors.shape[-2:])
        return all(
            own_frame((int(h), int(w)), divisible) == frame
            for h, w in prepared.image_list.image_sizes
        )

    def _teacher_levels(
        self, prepared: Prepared, targets: Targets, s_levels: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The teacher's distilled levels of the batch: from the cache where it holds them."""
        tensors = prepared.image_list.tensors
        cache = self.teacher_cache
        if cache is None:
            return self._live_teacher(tensors)
        ids = entry_ids(targets, prepared.image_list.image_sizes)
        if ids is None or not self._in_own_frames(prepared):
            cache.stats.live_batches += 1
            return self._live_teacher(tensors)
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in s_levels.values()]
        entries = [cache.load(entry, sizes) for entry in ids]
        missing = [k for k, entry in enumerate(entries) if not entry]
        if missing:
            live = self._live_teacher(tensors[missing])
            for j, k in enumerate(missing):
                entries[k] = [level[j] for level in live.values()]
                cache.store(ids[k], entries[k])
        cache.stats.hits += len(ids) - len(missing)
        cache.stats.misses += len(missing)
        # float32 throughout: entries are stored so, and a feature computed under autocast
        # (bfloat16, float16) converts exactly; FGD computes in float32 either way.
        device = tensors.device
        return {
            name: torch.stack([entry[i].to(device, torch.float32) for entry in entries])
            for i, name in enumerate(self.levels)
        }

    def forward(self, images: Sequence[Tensor], targets: Targets) -> dict[str, Tensor]:
        batch = self.features(images, targets)
        terms = self.fgd(
            batch.student, batch.teacher, batch.boxes, batch.input_hw, batch.image_sizes
        )
        return {**batch.detection, **terms}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's and the FGD modules' parameters; never the teacher's."""
        for module in (self.student, self.fgd):
            yield from (p for p in module.parameters() if p.requires_grad)

    def checkpoint_state(self) -> dict[str, dict[str, Tensor]]:
        return {"model": self.student.state_dict(), "fgd": self.fgd.state_dict()}

    def load_checkpoint_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.student.load_state_dict(state["model"])
        self.fgd.load_state_dict(state["fgd"])
