"""Where a service computes: `--device cpu|cuda|auto`, resolved here and nowhere else.

`auto` is cuda when torch sees a CUDA device, else cpu. Asking for cuda where there is none is an error naming
the flag, raised before anything is loaded. On cuda the gateway's part of the model runs in bfloat16 (FP8
projections dequantized at load) and pools keep routed experts in FP8 (block-scaled FP8 grouped GEMMs); on cpu
everything stays as it was: float32, experts dequantized once.

Imports torch only when resolving: light clients (GatewayConfig, `expertmesh up`) read DEVICE_CHOICES.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.errors import ExpertmeshError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "Where to compute: auto (cuda when torch sees a GPU, else cpu), cpu or cuda."


class DeviceUnavailableError(ExpertmeshError):
    """A device was asked for (a flag) that this machine or this torch build does not have."""


def check_device_name(name: str, flag: str = "--device") -> str:
    """The name, when it is one of DEVICE_CHOICES; else DeviceUnavailableError naming the flag (no torch import)."""
    if name not in DEVICE_CHOICES:
        raise DeviceUnavailableError(f"{flag} must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    return name


def resolve_device(name: str | torch.device = "auto", flag: str = "--device") -> torch.device:
    """auto|cpu|cuda (or a torch.device) -> the torch.device to compute on; DeviceUnavailableError when cuda is
    asked for and torch sees none."""
    import torch

    if isinstance(name, torch.device):
        name = name.type if name.index is None else str(name)
    kind = name.split(":", 1)[0]
    check_device_name(kind, flag)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        build = (
            f"torch {torch.__version__} built without CUDA"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
        )
        raise DeviceUnavailableError(f"{flag} {name}: CUDA is not available here ({build}); use {flag} cpu or auto")
    return torch.device(name)


def serving_dtype(device: torch.device) -> torch.dtype:
    """The gateway's compute dtype on a device: bfloat16 on cuda (the checkpoint's), float32 on cpu (exact)."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


class HostExperts:
    """An experts backend that takes host tensors (remote experts encode for the wire on the host), for a model on
    another device: each MoE layer's activations and routing go to the host once, the partial sums come back."""

    def __init__(self, backend, device: torch.device):
        self.backend, self.device = backend, device

    def start(self, layer: int, hidden: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor):
        pending = self.backend.start(layer, hidden.cpu(), topk_idx.cpu(), topk_w.cpu())
        return lambda: pending().to(self.device, hidden.dtype)

    def __getattr__(self, name: str):  # the rest (placement, counters, close) is the backend's
        return getattr(self.backend, name)


def experts_on(backend, device: torch.device):
    """`backend` (which takes host tensors) for a model on `device`."""
    return backend if device.type == "cpu" else HostExperts(backend, device)


def on_host(fn):
    """`fn` (which reads host tensors, e.g. the load recorder's numpy counts) called with its tensors on the host."""
    return lambda *args: fn(*(a.cpu() if hasattr(a, "cpu") else a for a in args))
