"""Benchmark: FGD loss forward+backward over a COCO-scale pyramid, against the loop baseline.

Batch 2, padded input 800x1216, levels P3-P7 (strides 8-128), 256 channels, 20 boxes per image.
Three forms of the same loss: the loop baseline (`fgd_reference.py`), the eager form
(`fgd_core.losses.dense`, blocks of torch ops) and the compiled form (`fgd_core.losses.compiled`:
on the CPU the native kernels of `fgd_core.losses.native`, elsewhere `torch.compile`). The first
compiled call is timed (the build of the native kernels, or the compile time, with the inductor
cache warm when every compiled graph came from it). Each form's values and gradients are checked against the loop's
(1e-5 relative), then the forms are timed alternately in one run with 1 and with 2 threads
(medians, and minima for busy machines), next to a memory-bound floor (reading the student and
teacher pyramids once). Peak memory of each form is measured in a child process.

    python benchmarks/fgd_loss.py [--repeats 7] [--no-compile] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fgd_reference import reference_fgd_level  # noqa: E402

import fgd_core.losses.compiled as compiled  # noqa: E402
from fgd_core.losses import MultiLevelFGD  # noqa: E402
from fgd_core.losses.compiled import inductor_cache_dir  # noqa: E402
from fgd_core.losses.native import native_cache_dir  # noqa: E402

BATCH, CHANNELS, INPUT_HW, BOXES = 2, 256, (800, 1216), 20
LEVELS = {f"P{k}": 2**k for k in range(3, 8)}
WEIGHTS = {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6, "temp": 0.5}
FORMS = ("eager", "compiled", "loop")


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
    loss = MultiLevelFGD(list(LEVELS), CHANNELS, CHANNELS, **WEIGHTS, compile=False)
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


def run_fgd(loss: MultiLevelFGD, student: dict, teacher: dict, boxes: list, compile: bool) -> dict:
    """One forward+backward of MultiLevelFGD, eager or compiled."""
    for level in loss.levels.values():
        level.use_compile = compile
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


def runner(kind: str, loss: MultiLevelFGD, student: dict, teacher: dict, boxes: list) -> Callable:
    if kind == "loop":
        return lambda: run_loop(loss, student, teacher, boxes)
    return lambda: run_fgd(loss, student, teacher, boxes, compile=kind == "compiled")


def read_floor(student: dict, teacher: dict) -> None:
    for name in student:
        student[name].sum()
        teacher[name].sum()


def check_agreement(
    loss: MultiLevelFGD, student: dict, teacher: dict, boxes: list, forms: list[str]
) -> dict:
    """Loss values and gradients of each form against the loop's, in relative terms."""
    grads = {}
    values = {}
    for kind in [*forms, "loop"]:
        feats = {k: v.detach().clone().requires_grad_(True) for k, v in student.items()}
        values[kind] = runner(kind, loss, feats, teacher, boxes)()
        # The GcBlocks' logit biases get no gradient in exact arithmetic (softmax is
        # shift-invariant), so every form gives rounding noise there: left out.
        grads[kind] = [feats[k].grad for k in feats] + [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in loss.named_parameters()
            if not name.endswith("conv_mask.bias")
        ]
    out = {}
    for kind in forms:
        rel_value = max(
            abs(values[kind][k] - values["loop"][k]) / max(abs(values["loop"][k]), 1e-30)
            for k in values["loop"]
        )
        rel_grad = max(
            float((a - b).norm() / b.norm().clamp_min(1e-30))
            for a, b in zip(grads[kind], grads["loop"], strict=True)
        )
        out[kind] = {"max_rel_value_diff": rel_value, "max_rel_grad_diff": rel_grad}
    return out


def first_compiled_call(fn: Callable[[], object]) -> dict:
    """Time the first compiled call; the cache was warm when no graph had to be compiled."""
    keys = {
        ("inductor", "fxgraph_cache_hit"): "hit",
        ("inductor", "fxgraph_cache_miss"): "miss",
        ("aot_autograd", "autograd_cache_hit"): "hit",
        ("aot_autograd", "autograd_cache_miss"): "miss",
    }
    before = {k: counters[k[0]][k[1]] for k in keys}
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    delta = {"hit": 0, "miss": 0}
    for k, kind in keys.items():
        delta[kind] += counters[k[0]][k[1]] - before[k]
    return {"s": seconds, "cache_warm": delta["miss"] == 0 and delta["hit"] > 0, **delta}


def native_in_use(feats: dict) -> bool:
    """Whether the compiled form runs the native kernels here (float32 CPU, and they built)."""
    level = compiled._DEFAULT
    return level.native and not level.native_failed and next(iter(feats.values())).is_cpu


def time_alternating(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum milliseconds of each function, called in turn `repeats` times."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return median, {k: min(v) * 1e3 for k, v in samples.items()}


def peak_memory_child(kind: str) -> None:
    """Child process: print the peak RSS (MiB) added by one forward+backward of `kind`.

    One warm-up call first (for the compiled form, the compilation), then freed memory is
    handed back to the system, and the peak of a second call over the RSS before it is taken.
    """
    torch.set_num_threads(1)
    loss = make_loss()
    student, teacher, boxes = make_inputs()
    feats = {k: v.requires_grad_(True) for k, v in student.items()}
    run = runner(kind, loss, feats, teacher, boxes)
    run()
    _zero_grads(loss, feats)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Reset the kernel's peak-RSS mark (VmHWM) so the peak is that of this call alone.
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    run()
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
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled form")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--memory-child", choices=FORMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return

    forms = ["eager"] if args.no_compile else ["eager", "compiled"]
    loss = make_loss()
    student, teacher, boxes = make_inputs()
    feats = {k: v.requires_grad_(True) for k, v in student.items()}
    results: dict = {
        "config": {
            "batch": BATCH,
            "channels": CHANNELS,
            "input": INPUT_HW,
            "levels": list(LEVELS),
            "boxes_per_image": BOXES,
            "forms": forms,
        }
    }
    torch.set_num_threads(1)
    if "compiled" in forms:
        cache = str(inductor_cache_dir())
        first = first_compiled_call(runner("compiled", loss, feats, teacher, boxes))
        results["compile_s"], results["compile_cache_warm"] = first["s"], first["cache_warm"]
        results["compile_native"] = native_in_use(feats)
        results["compile_cache_dir"] = (
            str(native_cache_dir()) if results["compile_native"] else cache
        )
        if results["compile_native"]:
            print(
                f"first compiled call (1 thread): {first['s']:.1f} s, native CPU kernels "
                f"({native_cache_dir()})"
            )
        else:
            print(
                f"compile (first compiled call, 1 thread): {first['s']:.1f} s, inductor cache "
                f"{'warm' if first['cache_warm'] else 'cold'} ({first['hit']} hits, "
                f"{first['miss']} misses; {cache})"
            )
    agreement = check_agreement(loss, student, teacher, boxes, forms)
    results["agreement"] = agreement
    for kind, diff in agreement.items():
        print(
            f"agreement of {kind} with the loop: max relative difference of values "
            f"{diff['max_rel_value_diff']:.2e}, of gradients {diff['max_rel_grad_diff']:.2e}"
        )
    if any(diff["max_rel_value_diff"] > 1e-5 for diff in agreement.values()):
        raise SystemExit("a form disagrees with the loop beyond 1e-5 relative")

    fns = {kind: runner(kind, loss, feats, teacher, boxes) for kind in ["loop", *forms]}
    fns["floor"] = lambda: read_floor(student, teacher)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row: dict = {}
        if "compiled" in forms and threads != 1:  # kernels are compiled per thread count
            row["compile_s"] = first_compiled_call(fns["compiled"])["s"]
        ms, fastest = time_alternating(fns, args.repeats)
        row.update({f"{kind}_ms": ms[kind] for kind in fns})
        for kind in forms:
            row[f"{kind}_speedup_vs_loop"] = ms["loop"] / ms[kind]
            row[f"{kind}_over_floor"] = ms[kind] / ms["floor"]
        # On a busy machine the medians wander; the minima show each form undisturbed.
        row["min_ms"] = fastest
        row["min_speedup_vs_loop"] = {k: fastest["loop"] / fastest[k] for k in forms}
        results[f"threads_{threads}"] = row
        print(
            f"threads={threads}: "
            + ", ".join(f"{kind} {ms[kind]:.1f} ms" for kind in fns)
            + " | "
            + ", ".join(
                f"{kind} {row[f'{kind}_speedup_vs_loop']:.2f}x the loop, "
                f"{row[f'{kind}_over_floor']:.1f}x the floor"
                for kind in forms
            )
            + " | minima: "
            + ", ".join(f"{kind} {fastest[kind]:.1f} ms" for kind in fns)
            + ", "
            + ", ".join(f"{k} {v:.2f}x the loop" for k, v in row["min_speedup_vs_loop"].items())
        )
    mem = {kind: peak_memory(kind) for kind in [*forms, "loop"]}
    results["peak_extra_mib"] = mem
    print(
        "peak extra memory (MiB): "
        + ", ".join(f"{kind} {mib:.0f}" for kind, mib in mem.items())
        + " | loop / "
        + ", loop / ".join(f"{kind} {mem['loop'] / max(mem[kind], 1e-9):.2f}x" for kind in forms)
    )
    results["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fgd_loss.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
