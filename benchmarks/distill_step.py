"""Benchmark: one FGD distillation step against a student step plus the teacher's features.

The reference is what distillation cannot avoid: one training step of the student and the
teacher's feature extraction (transform, backbone and FPN, no heads) under no_grad, on the
same batch. Both are timed alternately in one run, at the demo's size and at a larger one
(RetinaNet R50 teacher, R18 student, 512 px, batch 2). Target: ratio <= 1.10.

    python benchmarks/distill_step.py [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fgd_core.detectors import (
    DetectorConfig,
    backbone_features,
    build_detector_from_config,
    head_losses,
    prepare,
)
from fgd_core.distill import Distiller
from fgd_core.training import FGDConfig

SETTINGS = {
    "demo": {
        "teacher": ("resnet34", 64),
        "student": ("resnet18", 64),
        "size": 128,
        "batch": 8,
        "fgd": FGDConfig(alpha=1e-5, beta=5e-6, gamma=5e-6, lambda_=5e-8, temp=2.0),
    },
    "large": {
        "teacher": ("resnet50", 256),
        "student": ("resnet18", 256),
        "size": 512,
        "batch": 2,
        "fgd": FGDConfig(),
    },
}


def make_batch(n: int, size: int, seed: int = 0) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(6, 2, generator=g) * size * 0.6
        wh = torch.rand(6, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 5, (6,))})
    return images, targets


def detector(backbone: str, fpn: int, size: int) -> torch.nn.Module:
    cfg = DetectorConfig(
        arch="retinanet",
        backbone=backbone,
        num_classes=4,
        fpn_channels=fpn,
        min_size=size,
        max_size=size,
    )
    return build_detector_from_config(cfg)


def measure(name: str, repeats: int) -> dict:
    s = SETTINGS[name]
    torch.manual_seed(0)
    teacher = detector(*s["teacher"], s["size"])
    student = detector(*s["student"], s["size"])
    distiller = Distiller(student, teacher, s["fgd"]).train()
    student.train()
    images, targets = make_batch(s["batch"], s["size"])
    opt_d = torch.optim.SGD(list(distiller.trainable_parameters()), lr=1e-4)
    opt_p = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def distill_step() -> None:
        losses = distiller(images, targets)
        opt_d.zero_grad()
        sum(losses.values()).backward()
        opt_d.step()

    def reference_step() -> None:
        # The student's own step, with the teacher's features taken from the same transformed
        # batch inside the step (where distillation needs them): a distill step minus FGD.
        prepared = prepare(student, images, targets)
        losses = head_losses(student, prepared, backbone_features(student, prepared))
        with torch.no_grad():
            backbone_features(teacher, prepared)
        opt_p.zero_grad()
        sum(losses.values()).backward()
        opt_p.step()

    times: dict[str, list[float]] = {"distill": [], "reference": []}
    distill_step()
    reference_step()
    for _ in range(repeats):
        for key, fn in (("distill", distill_step), ("reference", reference_step)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    d, r = statistics.median(times["distill"]), statistics.median(times["reference"])
    row = {
        "distill_s": d,
        "reference_s": r,
        "ratio": d / r,
        "repeats": repeats,
        "size": s["size"],
        "batch": s["batch"],
        "teacher": s["teacher"],
        "student": s["student"],
    }
    print(
        f"{name}: distill step {d * 1e3:.0f} ms, student step + teacher features "
        f"{r * 1e3:.0f} ms, ratio {d / r:.3f}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = {name: measure(name, args.repeats) for name in SETTINGS}
    results["machine"] = {
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill_step.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'distill_step.json'}")
    print(f"ratio {results['large']['ratio']:.2f}")


if __name__ == "__main__":
    main()
