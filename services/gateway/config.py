"""GatewayConfig: every setting of the gateway, once. The gateway's flags, `expertmesh up` and the Helm chart's
`gateway:` values are derived from these fields (see services/settings.py for the naming rule). Imports no torch:
light clients (`up`, the CLI) read it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from services.dispatch import DISPATCH_DTYPES, POOL_TRANSPORTS
from services.math.device import DEVICE_CHOICES, DEVICE_HELP
from services.settings import setting

DEFAULT_CACHE_TOKENS = 32768
DEFAULT_BLOCK_SIZE = 64
DEFAULT_PREFIX_CACHING = True
DEFAULT_MAX_STEP_TOKENS = 2048
DEFAULT_MAX_DECODE_STALL = 4.0
DEFAULT_MAX_RUNNING = 64
DEFAULT_MAX_WAITING = 1024
MAX_SPECULATIVE_TOKENS = 8
DEFAULT_FEWEST_POOLS_MAX_TOKENS = 4  # measured on CPU (BENCHMARKS.md, distributed serving)
DEFAULT_MTP_MAX_BATCH = 4  # measured on CPU (BENCHMARKS.md, MTP): drafting pays at 1-4 running, breaks even at 8


@dataclass(frozen=True)
class GatewayConfig:
    model: Path | None = setting(None, "Model directory (a Hugging Face DeepSeek-V3 checkpoint).")
    redis: str | None = setting(None, "Redis URL holding the placement and receiving the load.")
    placement: Path | None = setting(None, "Placement JSON, when not read from Redis.")
    host: str = setting("127.0.0.1", "Address to listen on (0.0.0.0 in a pod).")
    grpc_port: int = setting(50051, "gRPC port (0: any free port).")
    metrics_port: int = setting(0, "Prometheus /metrics port (0: off).")
    http_port: int = setting(
        8000, "OpenAI-compatible HTTP API port, /health and /metrics too (0: any free port; -1: off)."
    )
    served_model_name: str | None = setting(
        None, "Model name of the OpenAI-compatible API (default: the model directory's name)."
    )
    dispatch_dtype: str = setting(
        "fp8", "Activations sent to the pools: fp8, bf16 or fp32 (exact).", choices=DISPATCH_DTYPES
    )
    cache_tokens: int = setting(DEFAULT_CACHE_TOKENS, "Latent KV cache capacity, in tokens.")
    block_size: int = setting(DEFAULT_BLOCK_SIZE, "Tokens per latent cache block.")
    prefix_caching: bool = setting(
        DEFAULT_PREFIX_CACHING,
        "Keep full cache blocks after their request and reuse them for prompts that start with the same tokens "
        "(whole blocks: a shared system prompt or an earlier turn is not computed again).",
    )
    max_step_tokens: int = setting(
        DEFAULT_MAX_STEP_TOKENS, "Most tokens in one step (decodes first, then prefill chunks)."
    )
    max_decode_stall: float = setting(
        DEFAULT_MAX_DECODE_STALL,
        "While requests decode, a step carries only the prefill tokens that keep its time within this many "
        "decode-only steps (measured; times the ratio of short prompts, which fit whole in that, to decoding "
        "requests where more of them wait; 0: off, prefill takes what the decodes leave of --max-step-tokens).",
    )
    max_running: int = setting(DEFAULT_MAX_RUNNING, "Most requests decoding at once; the rest wait.")
    max_waiting: int = setting(DEFAULT_MAX_WAITING, "Most requests waiting for admission; more are refused.")
    micro_batches: int = setting(1, "Split each step so attention of one part overlaps the pools' work.")
    mtp: bool = setting(
        False,
        "Speculative decoding with the checkpoint's multi-token-prediction layer: each decode "
        "step verifies the draft it proposed (greedy output unchanged).",
    )
    num_speculative_tokens: int = setting(
        1,
        "Draft tokens per step with --mtp: 1 runs DeepSeek-V3's one MTP layer once; more apply it again on its own "
        "guesses (as vLLM does).",
    )
    mtp_max_batch: int = setting(
        DEFAULT_MTP_MAX_BATCH,
        "With --mtp: while more than this many requests run at once, drafting pauses (verifying costs more than "
        "it saves in larger batches) and resumes when fewer run (0: no limit; BENCHMARKS.md, MTP).",
    )
    pool_call_deadline_s: float = setting(10.0, "Seconds per expert-pool call before it fails over.")
    pool_transport: str = setting(
        "stream",
        "How batches travel to the pools: stream (one long-lived ForwardStream per pool) or unary (a Forward "
        "call per pool per MoE layer, for proxies that do not carry long-lived streams).",
        choices=POOL_TRANSPORTS,
    )
    fewest_pools_max_tokens: int = setting(
        DEFAULT_FEWEST_POOLS_MAX_TOKENS,
        "A MoE layer of at most this many tokens goes to as few pools as hold its experts (one round trip instead "
        "of one per pool, where experts are replicated); larger ones are dealt over the replicas by their shares "
        "(0: always dealt).",
    )
    pool_wait_s: float = setting(120.0, "Seconds to wait at start for every pool of the placement to serve.")
    placement_wait_s: float = setting(600.0, "Seconds to wait at start for a placement to appear in Redis.")
    api_key: str | None = setting(
        None, "API keys clients must send (comma-separated; default $EXPERTMESH_API_KEY; none: no authentication)."
    )
    tls_dir: Path | None = setting(
        None,
        "Mutual TLS for gRPC: a directory with ca.crt, tls.crt, tls.key (default "
        "$EXPERTMESH_TLS_DIR; none: plain text).",
    )
    drain_timeout_s: float = setting(
        60.0, "Seconds running requests get to finish after SIGTERM (new ones are refused)."
    )
    threads: int = setting(0, "Torch threads (0: torch's default, all cores).")
    burst_threads: int = setting(
        0,
        "Torch threads while no routed-expert call is out (a step's dense layers before its first expert call, "
        "the final norm and lm_head after its last answer): with pools on the same host, the cores they leave idle "
        "then (0: --threads).",
    )
    device: str = setting(
        "auto",
        DEVICE_HELP + " On cuda the gateway computes in bfloat16 (FP8 projections dequantized at load).",
        choices=DEVICE_CHOICES,
    )

    @property
    def model_name(self) -> str:
        """The name clients of the OpenAI-compatible API ask for."""
        return self.served_model_name or (Path(self.model).name if self.model else "")

    def __post_init__(self):
        for name in ("cache_tokens", "block_size", "max_step_tokens", "max_running", "max_waiting", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.max_decode_stall) or (self.max_decode_stall != 0 and self.max_decode_stall <= 1):
            raise ValueError(f"max_decode_stall must be 0 (off) or a finite number > 1, got {self.max_decode_stall}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: all cores), got {self.threads}")
        if self.burst_threads < 0:
            raise ValueError(f"burst_threads must be >= 0 (0: --threads), got {self.burst_threads}")
        if self.fewest_pools_max_tokens < 0:
            raise ValueError(f"fewest_pools_max_tokens must be >= 0 (0: off), got {self.fewest_pools_max_tokens}")
        if self.mtp_max_batch < 0:
            raise ValueError(f"mtp_max_batch must be >= 0 (0: no limit), got {self.mtp_max_batch}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must lie in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}"
            )
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must lie in [-1, 65535] (0: any free port, -1: off), got {self.http_port}")
        if self.dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch_dtype must be one of {', '.join(DISPATCH_DTYPES)}, got {self.dispatch_dtype!r}")
        if self.pool_transport not in POOL_TRANSPORTS:
            raise ValueError(f"pool_transport must be one of {', '.join(POOL_TRANSPORTS)}, got {self.pool_transport!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
