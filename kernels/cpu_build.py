"""The CPU kernels (kernels/cpu/*.c) as one shared library, built with the machine's C compiler at first use.

The library is compiled with `$CC` (else `cc`/`gcc`) for this CPU (`-march=native`, OpenMP on torch's own
libgomp) into a cache directory (`$EXPERTMESH_KERNEL_CACHE`, else `$XDG_CACHE_HOME/expertmesh/kernels`, else
`~/.cache/expertmesh/kernels`), keyed by the sources, the flags, the compiler and the CPU's features; a damaged
cached build is rebuilt once. Where no compiler is found or the build fails, `library()` is None and callers
use torch (logged once, with the reason). `EXPERTMESH_CPU_KERNELS=off` turns the kernels off.
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

log = logging.getLogger(__name__)

SOURCES = tuple(sorted((Path(__file__).with_name("cpu")).glob("*.c")))
HEADERS = tuple(sorted((Path(__file__).with_name("cpu")).glob("*.h")))  # part of the build's key
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")
_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# every entry point and its C signature (argument types; each returns an int status)
SIGNATURES = {
    # kind, x, T, gate, up, down, 3 scales, stride, H, I, R, token, row, weight, P, out, threads
    "em_e4m3_fast": [],
    "em_routed_swiglu": [_INT, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _P, _INT],
    # x, T, K, row stride, q, scales | q, scales, T, K, kind, out
    "em_act_quant": [_P, _I64, _I64, _I64, _P, _P],
    "em_act_dequant": [_P, _P, _I64, _I64, _INT, _P],
    # q, scales, N, K, rows per scale row, kind, out, threads
    "em_fp8_dequant": [_P, _P, _I64, _I64, _I64, _INT, _P, _INT],
    # token, expert, weight, owner, P, T, O, pairs_of, rows_of, token_out, expert_out, weight_out, packed, rows
    "em_split_pairs": [_P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P],
    # packed, weight, P, rows, experts, held, token, expert, weight_out
    "em_check_pairs": [_P, _P, _I64, _I64, _I64, _P, _P, _P, _P],
    # scores, bias, T, E, groups, topk_group, K, norm, factor, idx, weight
    "em_route": [_P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _F32, _P, _P],
    # x, rows, n, row stride, out
    "em_argmax_rows": [_P, _I64, _I64, _I64, _P],
    # x, rows, n, row stride, weight, eps, out
    "em_rms_norm": [_P, _I64, _I64, _I64, _P, _F32, _P],
    # q_lat and q_pe each with token and head strides, T, nh, C, D, cache, slots, key_slots, width, q_start, q_len,
    # k_len, B, scale, out with token and head strides, threads
    "em_latent_attention": [
        *(_P, _I64, _I64) * 2,
        *(_I64, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _P, _I64, _F32),
        *(_P, _I64, _I64, _INT),
    ],
}
# the entry points' status codes: 0 done, -1 bad sizes, -2 and -3 an index out of range (what each means is the
# kernel's own), -4 no memory for the scratch


def check_status(rc: int, kernel: str, bad_index: dict[int, str]) -> None:
    """A kernel's status -> nothing (0), ValueError naming the index out of range (-2, -3: `bad_index` says
    which), MemoryError (-4) or RuntimeError."""
    if rc == 0:
        return
    if rc in bad_index:
        raise ValueError(bad_index[rc])
    if rc == -4:
        raise MemoryError(f"the CPU {kernel} kernel could not allocate its scratch")
    raise RuntimeError(f"the CPU {kernel} kernel failed ({rc})")


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
    parts = [s.read_bytes() for s in SOURCES + HEADERS] + [
        " ".join(FLAGS).encode(),
        cc.encode(),
        _cpu_features().encode(),
    ]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: processes building at once each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(cc: str) -> ctypes.CDLL:
    path = _build(cc)
    try:
        return ctypes.CDLL(str(path))
    except OSError:  # a damaged cached build (a full disk, a killed copy): once more from the sources
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(_build(cc)))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (turned off, no compiler, or the build failed: logged once)."""
    if os.environ.get("EXPERTMESH_CPU_KERNELS", "on").lower() in ("0", "off", "false", "no"):
        log.info("CPU kernels turned off (EXPERTMESH_CPU_KERNELS): the CPU kernels' work runs through torch")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.warning("no C compiler found (set CC): the CPU kernels' work runs through torch (slower)")
        return None
    try:
        lib = _load(cc)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels not built (%s): the CPU kernels' work runs through torch", e)
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib
