"""Benchmark: FGD loss forward+backward over a COCO-scale pyramid, against the loop baseline.

Batch 2, padded input 800x1216, levels P3-P7 (strides 8-128), 256 channels, 20 boxes per image.
Checks that both implementations agree to 1e-5 relative, then times them alternately in one run
with 1 and with 2 threads, next to a memory-bound floor (reading the student and teacher
pyramids once). Peak memory of each implementation is measured in a child process.

    python benchmarks/fgd_loss.py [--repeats 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fgd_reference import reference_fgd_level  # noqa: E402

from fgd_core.losses import MultiLevelFGD  # noqa: E402

BATCH, CHANNELS, INPUT_HW, BOXES = 2, 256, (800, 1216), 20
LEVELS = {f"P{k}": 2**k for k in range(3, 8)}
WEIGHTS = {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6, "temp": 0.5}


def make_inputs(seed: int = 0) -> tuple[dict, dict, list[torch.Tensor]]:
    """Random student/teacher pyramids and 20 random boxes per image, in input pixels."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = {}, {}
    for name, stride in LEVELS.items():
        h, w = -(-INPUT_HW[0] // stride), -(-INPUT_HW[1] // stride)
        student[name] = torch.randn(BATCH, CHANNELS, h, w, generator=g)
        teacher[name] = 3 * torch.randn(BATCH, CHANNELS, h, w, generator=g)
    boxes = []
    for _ in range(BATCH):
        xy = torch.rand(BOXES, 2, generator=g) * torch.tensor([INPUT_HW[1], INPUT_HW[0]]) * 0.8
        wh = (torch.rand(BOXES, 2, generator=g) * 0.3 + 0.01) * torch.tensor(
            [INPUT_HW[1], INPUT_HW[0]]
        )
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return student, teacher, boxes


def make_loss(seed: int = 0) -> MultiLevelFGD:
    torch.manual_seed(seed)
    loss = MultiLevelFGD(list(LEVELS), CHANNELS, CHANNELS, **WEIGHTS)
    # Non-zero GcBlock outputs, as after some training, so the global term is exercised.
    for level in loss.levels.values():
        for block in (level.student_context, level.teacher_context):
            torch.nn.init.normal_(block.channel_add[-1].weight, std=0.02)
    return loss


def _zero_grads(loss: MultiLevelFGD, student: dict) -> None:
    """As a training step does (optimizer.zero_grad(set_to_none=True)) before backward."""
    loss.zero_grad(set_to_none=True)
    for feat in student.values():
        feat.grad = None


def run_fast(loss: MultiLevelFGD, student: dict, teacher: dict, boxes: list) -> dict:
    _zero_grads(loss, student)
    out = loss(student, teacher, boxes, INPUT_HW)
    total = sum(out.values())
    total.backward()
    return {k: float(v.detach()) for k, v in out.items()}


def run_loop(loss: MultiLevelFGD, student: dict, teacher: dict, boxes: list) -> dict:
    _zero_grads(loss, student)
    terms = {"fg": 0.0, "bg": 0.0, "attention": 0.0, "global": 0.0}
    total = 0.0
    for name, level in loss.levels.items():
        raw = reference_fgd_level(
            student[name],
            teacher[name],
            boxes,
            INPUT_HW,
            None,
            temp=level.temp,
            align=level.align,
            student_context=level.student_context,
            teacher_context=level.teacher_context,
        )
        weights = {"fg": level.alpha, "bg": level.beta, "attention": level.gamma}
        weights["global"] = level.lambda_
        for key, value in raw.items():
            weighted = value * weights[key]
            total = total + weighted
            terms[key] += float(weighted.detach())
    total.backward()
    return {f"loss_fgd_{k}": v for k, v in terms.items()}


def read_floor(student: dict, teacher: dict) -> None:
    for name in student:
        student[name].sum()
        teacher[name].sum()


def check_agreement(loss: MultiLevelFGD, student: dict, teacher: dict, boxes: list) -> dict:
    """Loss values and gradients of both forms, compared in relative terms."""
    grads = {}
    values = {}
    for label, fn in (("fast", run_fast), ("loop", run_loop)):
        feats = {k: v.clone().requires_grad_(True) for k, v in student.items()}
        loss.zero_grad(set_to_none=True)
        values[label] = fn(loss, feats, teacher, boxes)
        # The GcBlocks' logit biases get no gradient in exact arithmetic (softmax is
        # shift-invariant), so both forms give rounding noise there: left out.
        grads[label] = [feats[k].grad for k in feats] + [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in loss.named_parameters()
            if not name.endswith("conv_mask.bias")
        ]
    rel_value = max(
        abs(values["fast"][k] - values["loop"][k]) / max(abs(values["loop"][k]), 1e-30)
        for k in values["loop"]
    )
    rel_grad = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30))
        for a, b in zip(grads["fast"], grads["loop"], strict=True)
    )
    return {"values": values, "max_rel_value_diff": rel_value, "max_rel_grad_diff": rel_grad}


def time_alternating(fns: dict, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def peak_memory_child(kind: str) -> None:
    """Child process: print the peak RSS (MiB) added by one forward+backward of `kind`."""
    torch.set_num_threads(1)
    loss = make_loss()
    student, teacher, boxes = make_inputs()
    feats = {k: v.requires_grad_(True) for k, v in student.items()}
    # Reset the kernel's peak-RSS mark (VmHWM) so the peak is that of this call alone.
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    (run_fast if kind == "fast" else run_loop)(loss, feats, teacher, boxes)
    print(json.dumps({"peak_extra_mib": (_rss_kib("VmHWM") - base) / 1024}))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(kind: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", kind],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--memory-child", choices=["fast", "loop"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return

    loss = make_loss()
    student, teacher, boxes = make_inputs()
    agreement = check_agreement(loss, student, teacher, boxes)
    print(
        f"agreement: max relative difference of values {agreement['max_rel_value_diff']:.2e}, "
        f"of gradients {agreement['max_rel_grad_diff']:.2e}"
    )
    if agreement["max_rel_value_diff"] > 1e-5:
        raise SystemExit("fast and loop forms disagree beyond 1e-5 relative")

    feats = {k: v.requires_grad_(True) for k, v in student.items()}
    fns = {
        "loop": lambda: run_loop(loss, feats, teacher, boxes),
        "fast": lambda: run_fast(loss, feats, teacher, boxes),
        "floor": lambda: read_floor(student, teacher),
    }
    results: dict = {
        "config": {
            "batch": BATCH,
            "channels": CHANNELS,
            "input": INPUT_HW,
            "levels": list(LEVELS),
            "boxes_per_image": BOXES,
        }
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ms = time_alternating(fns, args.repeats)
        row = {
            "loop_ms": ms["loop"],
            "fast_ms": ms["fast"],
            "floor_ms": ms["floor"],
            "speedup_vs_loop": ms["loop"] / ms["fast"],
            "fast_over_floor": ms["fast"] / ms["floor"],
        }
        results[f"threads_{threads}"] = row
        print(
            f"threads={threads}: loop {ms['loop']:.1f} ms, fast {ms['fast']:.1f} ms, "
            f"floor {ms['floor']:.2f} ms | speed-up vs loop {row['speedup_vs_loop']:.2f}x, "
            f"fast / floor {row['fast_over_floor']:.1f}x"
        )
    mem = {"fast": peak_memory("fast"), "loop": peak_memory("loop")}
    results["peak_extra_mib"] = mem
    results["memory_ratio_loop_over_fast"] = mem["loop"] / max(mem["fast"], 1e-9)
    print(
        f"peak extra memory: fast {mem['fast']:.0f} MiB, loop {mem['loop']:.0f} MiB "
        f"(loop / fast {results['memory_ratio_loop_over_fast']:.2f}x)"
    )
    results["agreement"] = {k: v for k, v in agreement.items() if k != "values"}
    results["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fgd_loss.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
