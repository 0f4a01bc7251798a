"""Talking to a running gateway: the `--target HOST:PORT` forms of `generate` and `score`. No torch here."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import grpc

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.errors import InvalidRequestError
from services.rpc import tls
from services.rpc.auth import API_KEY_ENV, bearer_metadata
from services.rpc.grpc_server import CHANNEL_OPTIONS

MODEL_INFO_TIMEOUT_S = 10.0
# gRPC codes that mean the request (or the address) was wrong: exit 2, like every bad argument; the rest are
# failures of the service (exit 1)
USAGE_CODES = frozenset(
    {"INVALID_ARGUMENT", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "UNAVAILABLE", "UNIMPLEMENTED"}
)


def check_target(target: str) -> None:
    """A gateway address: HOST:PORT (or a gRPC target URI such as dns:///host:port or unix:path)."""
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequestError(f"--target must be HOST:PORT with a port in [1, 65535], got {target!r}")


def rpc_error(target: str, exc: grpc.RpcError) -> tuple[str, int]:
    """(one-line message, exit code) for a failed call to the gateway at `target`."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if name == "UNAVAILABLE":
        return f"gateway at {target} is unreachable or not serving (UNAVAILABLE: {details})", 2
    return f"{target}: {name}: {details}", 2 if name in USAGE_CODES else 1


class GatewayClient:
    def __init__(self, target: str, timeout_s: float = 300.0, api_key: str | None = None):
        self.target = target
        self.channel = tls.channel(target, options=CHANNEL_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = bearer_metadata(api_key or os.environ.get(API_KEY_ENV, "").split(",")[0].strip() or None)

    def model_info(self) -> dict:
        """The served model's limits: {"vocab_size", "max_context", ...} (0 where the gateway does not say)."""
        r = self.stub.GetModelInfo(
            gateway_pb2.GetModelInfoRequest(), timeout=min(self.timeout_s, MODEL_INFO_TIMEOUT_S), metadata=self.metadata
        )
        return {
            "model_dir": r.model_dir,
            "vocab_size": r.vocab_size,
            "max_context": r.max_context,
            "num_hidden_layers": r.num_hidden_layers,
            "n_routed_experts": r.n_routed_experts,
            "pools": list(r.pools),
            "dispatch_dtype": r.dispatch_dtype,
        }

    def generate(
        self,
        text: str | None,
        token_ids: list[int] | None,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> dict:
        """-> the JSON object of `expertmesh generate --json`; `on_text` is given each piece of text as it arrives."""
        sampling = gateway_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, ignore_eos=ignore_eos
        )
        if seed is not None:
            sampling.seed = seed
        request = gateway_pb2.GenerateRequest(text=text or "", token_ids=token_ids or [], sampling=sampling)
        prompt, tokens, text_out, reason = [], [], "", None
        # no deadline on the whole stream (a long output takes as long as it takes): `timeout_s` bounds the silence
        # between two messages instead
        call = self.stub.Generate(request, metadata=self.metadata)
        with _SilenceWatchdog(call, self.timeout_s) as watchdog:
            for msg in watchdog.messages():
                prompt = prompt or list(msg.prompt_token_ids)
                tokens.extend(msg.token_ids)
                text_out += msg.text
                if on_text is not None and msg.text:
                    on_text(msg.text)
                reason = msg.finish_reason or reason
        return {"prompt_token_ids": prompt, "token_ids": tokens, "text": text_out, "finish_reason": reason}

    def score(self, text: str | None, token_ids: list[int] | None, top_k: int) -> dict:
        """-> the JSON object of `expertmesh score --json`."""
        r = self.stub.Score(
            gateway_pb2.ScoreRequest(text=text or "", token_ids=token_ids or [], top_k=top_k),
            timeout=self.timeout_s,
            metadata=self.metadata,
        )
        return {
            "token_ids": list(r.token_ids),
            "positions": [
                {
                    "token_id": p.token_id,
                    "logprob": p.logprob if p.HasField("logprob") else None,
                    "top": [{"token_id": t.token_id, "logprob": t.logprob} for t in p.top],
                }
                for p in r.positions
            ],
        }

    def close(self) -> None:
        self.channel.close()


class GatewaySilentError(grpc.RpcError):
    """A streamed call that got no message for `seconds`: cancelled, reported as DEADLINE_EXCEEDED."""

    def __init__(self, seconds: float):
        super().__init__(f"no message from the gateway in {seconds:g} s")
        self.seconds = seconds

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return f"no message from the gateway in {self.seconds:g} s: the call was cancelled"


class _SilenceWatchdog:
    """Cancels a streaming call once `seconds` pass without a message (a thread that waits for each one)."""

    def __init__(self, call, seconds: float):
        self.call, self.seconds = call, seconds
        self.fired = False
        self._arrived = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gateway-silence-watchdog", daemon=True)

    def __enter__(self) -> _SilenceWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._arrived.set()
        self._thread.join()
        if exc[0] is not None and not self.call.done():
            self.call.cancel()  # an error or Ctrl-C here: the gateway frees the request

    def messages(self):
        try:
            for msg in self.call:
                self._arrived.set()
                yield msg
        except grpc.RpcError:
            if self.fired:
                raise GatewaySilentError(self.seconds) from None
            raise

    def _watch(self) -> None:
        while not self._done.is_set():
            if not self._arrived.wait(self.seconds):
                self.fired = True
                self.call.cancel()
                return
            self._arrived.clear()
