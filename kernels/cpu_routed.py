"""The routed experts' SwiGLU on the CPU as one C kernel (kernels/cpu/routed_swiglu.c), built on first use.

Decode routes a few tokens to each of many experts. torch can only run that as one small GEMM chain per expert
(call overhead and MKL's per-call weight packing) or as every token through every held expert (all the
products, most of them thrown away). The kernel computes only the routed products, reading each weight row
once per expert and reusing it for that expert's tokens, with fp32 accumulation; weights fp32 or bf16.

The kernel is compiled with the machine's C compiler (`$CC`, else `cc`/`gcc`) for this CPU (`-march=native`)
into a cache directory (`$EXPERTMESH_KERNEL_CACHE`, else `$XDG_CACHE_HOME/expertmesh/kernels`, else
`~/.cache/expertmesh/kernels`), keyed by the source, the flags and the CPU's features. Where no compiler is
found or the build fails, `library()` is None and callers use torch (logged once, with the reason).
`EXPERTMESH_CPU_KERNELS=off` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu") / "routed_swiglu.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-fopenmp")
DTYPES = (torch.float32, torch.bfloat16)  # weight dtypes the kernel reads
# below this many bytes of weights per thread, one thread (starting one costs more than it saves)
BYTES_PER_THREAD = 8 << 20


def cache_dir() -> Path:
    if os.environ.get("EXPERTMESH_KERNEL_CACHE"):
        return Path(os.environ["EXPERTMESH_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "expertmesh" / "kernels"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(), _cpu_features().encode()]))
    target = cache_dir() / f"routed_swiglu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: processes building at once each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (turned off, no compiler, or the build failed: logged once)."""
    if os.environ.get("EXPERTMESH_CPU_KERNELS", "on").lower() in ("0", "off", "false", "no"):
        log.info("CPU expert kernel turned off (EXPERTMESH_CPU_KERNELS); routed experts run through torch")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.warning("no C compiler found (set CC): routed experts run through torch, about 2x slower at decode")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU expert kernel not built (%s): routed experts run through torch", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.em_routed_swiglu.argtypes = [p, p, p, ctypes.c_int, i64, i64, i64, p, p, p, p, p, i64, p, p, p, ctypes.c_int]
    lib.em_routed_swiglu.restype = ctypes.c_int
    return lib


def handles(weight: torch.Tensor) -> bool:
    """Whether the kernel can run experts stacked as `weight` (a CPU tensor of a dtype it reads, once built)."""
    return weight.device.type == "cpu" and weight.dtype in DTYPES and library() is not None


def routed_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """out [T, H] fp32 = sum over pairs p of weight[p] * down_r(silu(gate_r(x[token[p]])) * up_r(x[token[p]])).

    x [T, H]; gate_up [R, 2I, H] (gate rows, then up rows) and down [R, H, I] in one dtype of DTYPES; the pairs
    grouped by expert: group g is counts[g] consecutive pairs through stack row rows[g] ([G] each); token [P] and
    weight [P] per pair."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU expert kernel is not available")
    r, i2, h = gate_up.shape
    i = i2 // 2
    if down.shape != (r, h, i) or gate_up.dtype != down.dtype or gate_up.dtype not in DTYPES:
        raise ValueError(f"expert stacks {tuple(gate_up.shape)} {gate_up.dtype} and {tuple(down.shape)} {down.dtype}")
    pairs = int(token.shape[0])
    if rows.shape != counts.shape or weight.shape != token.shape or int(counts.sum()) != pairs:
        raise ValueError("groups and pairs disagree")
    # the C code indexes with these: out of range would be a write outside the tensors, never an error
    if pairs and not 0 <= int(token.min()) <= int(token.max()) < x.shape[0]:
        raise ValueError(f"a pair's token is outside 0..{x.shape[0] - 1}")
    if len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < r:
        raise ValueError(f"a group's stack row is outside 0..{r - 1}")
    x = x.to(torch.float32).contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    rows, counts, token = (t.to(torch.int64).contiguous() for t in (rows, counts, token))
    weight = weight.to(torch.float32).contiguous()
    start = torch.cumsum(counts, 0) - counts  # [G]
    gu = torch.empty(pairs, i2)  # [P, 2I] scratch
    act = torch.empty(pairs, i)  # [P, I] scratch
    out = torch.zeros(x.shape[0], h)  # [T, H]
    threads = max(1, min(torch.get_num_threads(), len(rows) * 3 * h * i * gate_up.element_size() // BYTES_PER_THREAD))
    lib.em_routed_swiglu(
        x.data_ptr(),
        gate_up.data_ptr(),
        down.data_ptr(),
        int(gate_up.dtype == torch.bfloat16),
        h,
        i,
        len(rows),
        start.data_ptr(),
        counts.data_ptr(),
        rows.data_ptr(),
        token.data_ptr(),
        weight.data_ptr(),
        pairs,
        gu.data_ptr(),
        act.data_ptr(),
        out.data_ptr(),
        threads,
    )
    return out
