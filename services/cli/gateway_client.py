"""Talking to a running gateway: the `--target HOST:PORT` forms of `generate` and `score`."""

from __future__ import annotations

import grpc

from expertmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.rpc.grpc_server import CHANNEL_OPTIONS


class GatewayClient:
    def __init__(self, target: str, timeout_s: float = 300.0):
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.timeout_s = timeout_s

    def generate(self, text: str | None, token_ids: list[int] | None, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, ignore_eos: bool = False) -> dict:
        """-> the JSON object of `expertmesh generate --json`."""
        sampling = gateway_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                              ignore_eos=ignore_eos)
        if seed is not None:
            sampling.seed = seed
        request = gateway_pb2.GenerateRequest(text=text or "", token_ids=token_ids or [], sampling=sampling)
        prompt, tokens, text_out, reason = [], [], "", None
        for msg in self.stub.Generate(request, timeout=self.timeout_s):
            prompt = prompt or list(msg.prompt_token_ids)
            tokens.extend(msg.token_ids)
            text_out += msg.text
            reason = msg.finish_reason or reason
        return {"prompt_token_ids": prompt, "token_ids": tokens, "text": text_out, "finish_reason": reason}

    def score(self, text: str | None, token_ids: list[int] | None, top_k: int) -> dict:
        """-> the JSON object of `expertmesh score --json`."""
        r = self.stub.Score(gateway_pb2.ScoreRequest(text=text or "", token_ids=token_ids or [], top_k=top_k),
                            timeout=self.timeout_s)
        return {"token_ids": list(r.token_ids), "positions": [
            {"token_id": p.token_id, "logprob": p.logprob if p.HasField("logprob") else None,
             "top": [{"token_id": t.token_id, "logprob": t.logprob} for t in p.top]} for p in r.positions]}

    def close(self) -> None:
        self.channel.close()
