"""Native CPU kernels for the full-size work of a level (`native_kernels.cpp`).

`NativePasses` has the interface of `fgd_core.losses.dense.BlockedPasses`: the same sums, taken
by one C++ kernel for the forward and one for the backward instead of blocks of torch ops. Each
kernel reads both features from memory once, a run of cells of one image per work item (OpenMP
threads over the items), with no op dispatch per block and no temporary the size of a block;
the small per-channel partial sums of the items are combined in torch.

Build. The kernels are compiled on first use with the system's C++ compiler (`$CXX`, else
`g++` or `c++`) with `-O3 -march=native -fopenmp`, which takes about a second, and the shared
library is kept under `$FGD_HOME/cache/native` (`FGD_HOME` defaulting to `~/.fgd`), named by a
hash of the source, the compiler, the flags and the CPU, so every later process of the machine
loads it at once. The library is loaded with ctypes (which releases the GIL during a call);
its OpenMP runtime is the `libgomp.so.1` that torch has already loaded. Without a compiler,
`native_passes()` raises `NativeUnavailable` with the reason, and the compiled path
(`fgd_core.losses.compiled`) falls back to `torch.compile`, then to the blocked torch passes.

Only float32 CPU tensors go through the kernels; the callers send anything else to the other
paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch import Tensor

from fgd_core.losses.dense import BlockedPasses, LevelSums

SOURCE = Path(__file__).with_name("native_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Cells per work item. The second sweep over an item reads its rows of both features (L x C x 8
# bytes) again from the caches; longer runs spread the per-row costs. 1024 was the fastest of
# 128-2048 on a 2-core EPYC (COCO-scale pyramid, 256 channels).
CELLS_PER_ITEM = 1024
MAX_RUN = 2048  # as in native_kernels.cpp
BUILD_TIMEOUT_S = 120.0

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "fgd_forward": (_P,) * 6 + (ctypes.c_float,) + (_I64,) * 4 + (ctypes.c_int,) + (_P,) * 4,
    "fgd_backward": (_P,) * 5 + (_I64,) * 4 + (ctypes.c_int,) + (_P,) * 3,
}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def native_cache_dir() -> Path:
    """`$FGD_HOME/cache/native`, FGD_HOME defaulting to ~/.fgd."""
    return Path(os.environ.get("FGD_HOME") or "~/.fgd").expanduser() / "cache" / "native"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def library_path(compiler: str) -> Path:
    """Where the build for this source, compiler, flags and CPU lives."""
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C++ compiler {compiler!r} does not run: {exc}") from exc
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode()):
        digest.update(part)
    digest.update(_cpu_signature().encode())
    return native_cache_dir() / f"fgd_native-{digest.hexdigest()[:16]}.so"


def build(compiler: str | None = None) -> Path:
    """Compile the kernels unless this machine's build exists; return the library's path.

    The library is written under a temporary name and renamed, so concurrent builders (Ray
    trials, test workers) never load a half-written file.
    """
    compiler = compiler or _compiler()
    path = library_path(compiler)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeUnavailable(f"cannot create {path.parent}: {exc}") from exc
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    cmd = [compiler, *FLAGS, str(SOURCE), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        tmp.unlink(missing_ok=True)
        raise NativeUnavailable(f"{' '.join(cmd)} failed: {exc}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise NativeUnavailable(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    os.replace(tmp, path)
    return path


_LOCK = threading.Lock()
_PASSES: NativePasses | None = None


def native_passes() -> NativePasses:
    """The process's `NativePasses`, building and loading the library on first use.

    Raises:
        NativeUnavailable: no compiler, a failed build, or a library that does not load.
    """
    global _PASSES
    with _LOCK:
        if _PASSES is None:
            path = build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise NativeUnavailable(f"cannot load {path}: {exc}") from exc
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = argtypes
                fn.restype = None
            _PASSES = NativePasses(lib)
        return _PASSES


def supported(*tensors: Tensor) -> bool:
    """Whether the kernels take these: float32 CPU tensors."""
    return all(x.device.type == "cpu" and x.dtype == torch.float32 for x in tensors)


def _ptr(x: Tensor) -> int:
    return x.data_ptr()


class NativePasses(BlockedPasses):
    """`BlockedPasses`' forward and backward over the native library (float32, CPU,
    contiguous), one kernel each."""

    def __init__(self, lib: ctypes.CDLL, cells_per_item: int = CELLS_PER_ITEM) -> None:
        if not 0 < cells_per_item <= MAX_RUN:
            raise ValueError(f"cells_per_item must be in 1..{MAX_RUN}, got {cells_per_item}")
        self.lib = lib
        self.cells_per_item = cells_per_item

    def forward(
        self,
        s: Tensor,
        t: Tensor,
        s_weight: Tensor,
        t_weight: Tensor,
        fg: Tensor,
        bg: Tensor,
        temp: float,
    ) -> LevelSums:
        B, C, N = s.shape
        L = self.cells_per_item
        K = -(-N // L)
        sw, tw = s_weight.contiguous(), t_weight.contiguous()
        fg, bg = fg.contiguous(), bg.contiguous()
        inv_ct = 1.0 / (C * temp)
        cell, logit = s.new_empty(B, 2, N), s.new_empty(B, 2, N)
        item_max, part = s.new_empty(B, K, 3), s.new_empty(B, K, 8, C)
        self.lib.fgd_forward(
            *(_ptr(s), _ptr(t), _ptr(sw), _ptr(tw), _ptr(fg), _ptr(bg), inv_ct),
            *(B, C, N, L, torch.get_num_threads()),
            *(_ptr(cell), _ptr(logit), _ptr(item_max), _ptr(part)),
        )
        # Each item's sums were taken against exp(x - its own max); the softmax over all cells
        # weighs an item by exp(its max - logsumexp(x)). x = cell_T / (C temp) for A_S(T)
        # (times N), the logits for the contexts.
        x = cell[:, 0] * torch.tensor(inv_ct, dtype=torch.float32)
        lse = torch.cat((torch.logsumexp(x, dim=1)[:, None], torch.logsumexp(logit, dim=2)), 1)
        scale = torch.exp(item_max - lse[:, None])  # (B, K, 3): A_S(T) (/ N), teacher, student
        scale[..., 0] *= N
        sums = part.sum(1)  # (B, 8, C)
        return LevelSums(
            chan=sums[:, 0:2],
            cell=cell,
            logit=logit,
            focal=torch.einsum("bk,bkjc->bjc", scale[..., 0], part[:, :, 2:4]),
            q_sum=sums[:, 4].sum(),
            s_ctx=torch.einsum("bk,bkc->bc", scale[..., 2], part[:, :, 5]),
            t_ctx=torch.einsum("bk,bkc->bc", scale[..., 1], part[:, :, 6]),
            d_sum=sums[:, 7],
        )

    def backward(
        self,
        s: Tensor,
        t: Tensor,
        need_s: bool,
        need_t: bool,
        chan: Tensor,
        cells: Tensor,
        k: Tensor,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        B, C, N = s.shape
        L = self.cells_per_item
        K = -(-N // L)
        chan, cells, k = chan.float().contiguous(), cells.float().contiguous(), k.contiguous()
        grad = torch.empty_like(s) if need_s else None
        lg, part = s.new_empty(B, 2, N), s.new_empty(B, K, 2, C)
        self.lib.fgd_backward(
            *(_ptr(s), _ptr(t), _ptr(chan), _ptr(cells), _ptr(k)),
            *(B, C, N, L, torch.get_num_threads()),
            *(_ptr(lg), _ptr(grad) if grad is not None else None, _ptr(part)),
        )
        return grad, lg, part.sum(1)
