"""Hostile and malformed calls against the gateway's and the pools' RPCs, property-based (hypothesis) and raw
bytes; each returns a count of the status codes it got. Used by tests/test_fuzz.py (a short run in CI) and by
scripts/fuzz.py (the long run whose figures RELIABILITY.md reports)."""

from __future__ import annotations

from collections import Counter

import grpc
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tensor_pb2
from services.gateway.pool_stream import STATUS_CODES

# answers that mean "your request is wrong" (or, by chance, a valid request served)
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
CALL_TIMEOUT_S = 20.0  # a call that takes longer counts as a hang (DEADLINE_EXCEEDED)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
U32, U64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
_SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _tensor(shape_max: int = 6, data_max: int = 4096):
    return st.builds(
        tensor_pb2.Tensor,
        dtype=st.integers(0, 6),  # unknown element types included
        shape=st.lists(st.one_of(st.integers(0, 400), U32), max_size=4),
        data=st.one_of(st.binary(max_size=data_max), st.just(b"")),
    )


def _hidden(hidden_size: int):
    """Mostly well-shaped hidden states, some with NaN/inf, some of a wrong dtype or width."""

    def build(rows, dtype, nan, width_off):
        x = torch.randn(rows, hidden_size + width_off)
        if nan:
            x[0, 0] = float(nan)
        x = x.to({1: torch.float32, 2: torch.bfloat16, 3: torch.float8_e4m3fn}[dtype])
        return tensor_pb2.Tensor(
            dtype=dtype, shape=list(x.shape), data=x.contiguous().view(torch.uint8).numpy().tobytes()
        )

    return st.builds(
        build,
        st.integers(1, 8),
        st.sampled_from([1, 2, 3]),
        st.sampled_from([0, 0, 0, "nan", "inf"]),
        st.sampled_from([0, 0, 0, -1, 7]),
    )


def _pairs(n_experts: int):
    def build(rows, count, expert_max, weight):
        pairs = torch.stack((torch.randint(0, rows, (count,)), torch.randint(-1, expert_max, (count,))), 1)
        weights = torch.full((count,), weight, dtype=torch.float32)
        return (
            tensor_pb2.Tensor(dtype=4, shape=[count, 2], data=pairs.to(torch.int32).numpy().tobytes()),
            tensor_pb2.Tensor(dtype=1, shape=[count], data=weights.numpy().tobytes()),
        )

    return st.builds(
        build,
        st.integers(1, 10),
        st.integers(0, 16),
        st.sampled_from([n_experts, n_experts * 3]),
        st.sampled_from([0.5, float("nan"), float("inf"), -1.0]),
    )


def forward_requests(hidden_size: int, n_layers: int, n_experts: int):
    def build(layer, hidden, scale, pairs, reply, version, raw):
        req = expert_pool_pb2.ForwardRequest(
            layer=layer, hidden=hidden, response_dtype=reply, placement_version=version
        )
        if scale is not None:
            req.hidden_scale.CopyFrom(scale)
        if raw is not None:  # wholly random tensors instead of plausible ones
            req.pairs.CopyFrom(raw[0])
            req.pair_weights.CopyFrom(raw[1])
        else:
            req.pairs.CopyFrom(pairs[0])
            req.pair_weights.CopyFrom(pairs[1])
        return req

    return st.builds(
        build,
        st.one_of(st.integers(0, n_layers + 2), U32),
        st.one_of(_hidden(hidden_size), _tensor()),
        st.one_of(st.none(), _tensor()),
        _pairs(n_experts),
        st.integers(0, 6),
        U64,
        st.one_of(st.none(), st.tuples(_tensor(), _tensor())),
    )


def sampling():
    return st.builds(
        gateway_pb2.SamplingParams,
        max_tokens=st.one_of(st.integers(0, 8), U32),
        temperature=FLOATS,
        top_p=FLOATS,
        top_k=st.one_of(st.integers(0, 50), U32),
        seed=st.one_of(st.none(), U64),
        stop_token_ids=st.lists(U32, max_size=5),
        ignore_eos=st.booleans(),
    )


def generate_requests():
    tokens = st.one_of(
        st.lists(st.one_of(st.integers(0, 600), U32), max_size=24), st.just(list(range(50_000)))
    )  # a huge repeated field
    return st.builds(gateway_pb2.GenerateRequest, text=st.text(max_size=40), token_ids=tokens, sampling=sampling())


def score_requests():
    tokens = st.lists(st.one_of(st.integers(0, 600), U32), max_size=24)
    return st.builds(
        gateway_pb2.ScoreRequest, text=st.text(max_size=40), token_ids=tokens, top_k=st.one_of(st.integers(0, 20), U32)
    )


def _first_two(stream) -> None:
    """A stream that could run long: read two messages, then hang up (a cancel the server must survive)."""
    for i, _ in enumerate(stream):
        if i == 1:
            # a grpc call, or (with OpenTelemetry's client instrumentation on) a generator wrapping one
            stream.cancel() if hasattr(stream, "cancel") else stream.close()
            return


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def fuzz_pool(address: str, examples: int, hidden_size: int, n_layers: int, n_experts: int) -> Counter:
    codes: Counter = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = expert_pool_pb2_grpc.ExpertPoolServiceStub(channel)

        @settings(max_examples=examples, **_SETTINGS)
        @given(forward_requests(hidden_size, n_layers, n_experts))
        def run(request):
            codes[_code(lambda: stub.Forward(request, timeout=CALL_TIMEOUT_S))] += 1

        run()
        codes.update(_raw_bytes(channel, "/expertmesh.v1.ExpertPoolService/Forward", examples, stream=False))
        codes.update(_on_one_stream(channel, forward_requests(hidden_size, n_layers, n_experts), examples))
    return codes


FORWARD_STREAM = "/expertmesh.v1.ExpertPoolService/ForwardStream"


def _on_one_stream(channel: grpc.Channel, requests, examples: int) -> Counter:
    """Generated requests and raw bytes, interleaved, all on one ForwardStream: every message must get its own
    in-band answer (the code it carries is counted) and the stream must outlive them all; if it ends early, the
    messages left unanswered count with the status it ended with."""
    sent: list[bytes] = []  # ForwardStreamRequest messages and raw bytes

    @settings(max_examples=examples, **_SETTINGS)
    @given(requests, st.binary(max_size=300))
    def collect(request, data):
        sent.extend([expert_pool_pb2.ForwardStreamRequest(request=request).SerializeToString(), data])

    collect()
    codes: Counter = Counter()
    answered = 0
    try:
        for answer in channel.stream_stream(FORWARD_STREAM)(iter(sent), timeout=CALL_TIMEOUT_S * 10):
            response = expert_pool_pb2.ForwardStreamResponse.FromString(answer)
            codes[STATUS_CODES[response.error_code]] += 1
            answered += 1
    except grpc.RpcError as err:
        codes[err.code()] += len(sent) - answered
    else:
        codes[grpc.StatusCode.UNKNOWN] += len(sent) - answered  # the stream ended without answering them
    return +codes  # counts of 0 dropped


def fuzz_gateway(address: str, examples: int) -> Counter:
    codes: Counter = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        @settings(max_examples=examples, **_SETTINGS)
        @given(generate_requests())
        def run_generate(request):
            codes[_code(lambda: _first_two(stub.Generate(request, timeout=CALL_TIMEOUT_S)))] += 1

        @settings(max_examples=examples, **_SETTINGS)
        @given(score_requests())
        def run_score(request):
            codes[_code(lambda: stub.Score(request, timeout=CALL_TIMEOUT_S))] += 1

        run_generate()
        run_score()
        codes.update(_raw_bytes(channel, "/expertmesh.v1.GatewayService/Score", examples, stream=False))
        codes.update(_raw_bytes(channel, "/expertmesh.v1.GatewayService/Generate", examples, stream=True))
    codes.pop(grpc.StatusCode.CANCELLED, None)  # our own hang-ups after two messages
    return codes


def _raw_bytes(channel: grpc.Channel, method: str, examples: int, stream: bool) -> Counter:
    codes: Counter = Counter()
    call = (channel.unary_stream if stream else channel.unary_unary)(method)  # bytes in, bytes out

    @settings(max_examples=examples, **_SETTINGS)
    @given(st.binary(max_size=300))
    def run(data):
        if stream:
            codes[_code(lambda: _first_two(call(data, timeout=CALL_TIMEOUT_S)))] += 1
        else:
            codes[_code(lambda: call(data, timeout=CALL_TIMEOUT_S))] += 1

    run()
    return codes
