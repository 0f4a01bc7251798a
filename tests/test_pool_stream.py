"""A gateway's long-lived ForwardStream to a pool: answers in order, each failed request answered in band with the
status and message a unary Forward would give (the stream serves on), a pool killed mid-stream fails what waits
on it at once, and a pool that stops answering costs one deadline, not a hang. Real pool processes on
127.0.0.1 (`python -m services.expert.server`), the gateway's own client (PoolStream, RemoteExperts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
import torch

from expertmesh.v1 import expert_pool_pb2, expert_pool_pb2_grpc
from services.dispatch import codec
from services.errors import PoolUnavailableError
from services.format.config import ModelConfig
from services.gateway.pool_stream import FORWARD_STREAM_METHOD, PoolCallError, PoolStream
from services.gateway.remote_experts import RemoteExperts
from services.math.routed_pairs import RoutedPairs
from services.state.placement import Placement, Pool

LAYER = 1


class PoolProcess:
    """`python -m services.expert.server` holding pool-0's share of a 2-pool spread placement."""

    def __init__(self, model, tmp_path):
        placement = Placement.spread(ModelConfig.from_file(model), [Pool("pool-0", "a"), Pool("pool-1", "b")])
        (tmp_path / "placement.json").write_text(placement.to_json())
        self.held = [e for layer, e in placement.experts_on("pool-0") if layer == LAYER]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.expert.server", "--model", str(model), "--pool-id", "pool-0"]
            + ["--placement", str(tmp_path / "placement.json")],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), line
        self.address = line.split()[1]
        self.channel = grpc.insecure_channel(self.address)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def pool(tiny_fp8, tmp_path):
    p = PoolProcess(tiny_fp8, tmp_path)
    yield p
    p.stop()


def _request(experts: list[int], rows: int = 2, layer: int = LAYER, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 320, generator=g)  # [T, H]
    token = torch.arange(len(experts)) % rows
    pairs = RoutedPairs(token, torch.tensor(experts), torch.full((len(experts),), 0.5))
    return codec.encode_request(layer, codec.DispatchRows(hidden, "fp32"), pairs)[1]


def _streamed(request):
    return expert_pool_pb2.ForwardStreamRequest(request=request)


def test_answers_in_order_and_failures_in_band(pool):
    held, missing = pool.held[:2], next(e for e in range(16) if e not in pool.held)
    unary = expert_pool_pb2_grpc.ExpertPoolServiceStub(pool.channel).Forward
    stream = PoolStream(pool.channel)
    good = [_request(held, seed=i) for i in range(3)]
    sent = [
        stream.send(_streamed(good[0]))[0],
        stream.send(_streamed(_request([held[0], 16])))[0],  # expert out of range
        stream.send(_streamed(good[1]))[0],
        stream.send(_streamed(_request([missing])))[0],  # not held here
        stream.send(_streamed(_request(held, layer=0)))[0],  # a dense layer
        stream.send(_streamed(good[2]))[0],
    ]
    for i, at in enumerate((0, 2, 5)):
        got = codec.decode_partial(sent[at].result(timeout=30), 2, 320)
        request = _request(held, seed=i)
        torch.testing.assert_close(got, codec.decode_partial(unary(request, timeout=30), 2, 320), rtol=0, atol=0)
    for at, code, message in (
        (1, grpc.StatusCode.INVALID_ARGUMENT, "pairs: expert 16 out of range [0, 16)"),
        (3, grpc.StatusCode.FAILED_PRECONDITION, f"pool pool-0 does not hold expert {missing} of layer 1"),
        (4, grpc.StatusCode.INVALID_ARGUMENT, "layer 0 is not an MoE layer"),
    ):
        with pytest.raises(PoolCallError) as exc:
            sent[at].result(timeout=30)
        assert exc.value.code() == code and exc.value.details().startswith(message), exc.value.details()
    assert sent[5].result(timeout=30).decode_us > 0  # where the pool's time went comes back with the answer
    stream.close()


def test_bytes_that_do_not_parse_are_answered_in_band(pool):
    call = pool.channel.stream_stream(FORWARD_STREAM_METHOD)  # raw bytes both ways
    good = expert_pool_pb2.ForwardStreamRequest(request=_request(pool.held[:1])).SerializeToString()
    answers = list(call(iter([good, b"\xff\xff\xff\xff garbage", good]), timeout=30))
    parsed = [expert_pool_pb2.ForwardStreamResponse.FromString(a) for a in answers]
    assert [p.error_code for p in parsed] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "does not parse as ForwardStreamRequest" in parsed[1].error_message


def test_a_pool_killed_mid_stream_fails_what_waits_at_once(pool):
    stream = PoolStream(pool.channel)
    stream.send(_streamed(_request(pool.held[:1])))[0].result(timeout=30)  # the stream is open
    os.kill(pool.proc.pid, signal.SIGSTOP)  # it cannot answer what comes now
    waiting = stream.send(_streamed(_request(pool.held[:2])))[0]
    time.sleep(0.2)
    assert not waiting.done()
    os.kill(pool.proc.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(PoolCallError) as exc:
        waiting.result(timeout=30)
    assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
    with pytest.raises(PoolCallError):  # a new stream to a dead pool fails too, and fast
        stream.send(_streamed(_request(pool.held[:1])))[0].result(timeout=30)
    assert time.monotonic() - started < 10
    stream.close()


class _Silent(grpc.GenericRpcHandler):
    """A pool that reads its stream and never answers."""

    def service(self, handler_call_details):
        def never(request_iterator, context):
            for _ in request_iterator:
                pass
            yield from ()

        return grpc.stream_stream_rpc_method_handler(never)


def test_a_pool_that_never_answers_costs_one_deadline(tiny_fp8):
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((_Silent(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cfg = ModelConfig.from_file(tiny_fp8)
    remote = RemoteExperts(Placement.spread(cfg, [Pool("pool-0", f"127.0.0.1:{port}")]), "fp32", deadline_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(PoolUnavailableError, match="no live replica"):
            remote.start(LAYER, torch.randn(2, 320), torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2))()
        assert 0.5 <= time.monotonic() - started < 5
        assert remote._dead_until["pool-0"] > time.monotonic()  # routed around from now on
    finally:
        remote.close()
        server.stop(0)


def test_the_pools_stamps_place_each_hop_of_a_round_trip(pool, tiny_fp8):
    """On one host the pool's CLOCK_MONOTONIC stamps (handler start, answer encoded) fall between the gateway's
    send and its reader thread's receipt, so `RemoteExperts.timings` splits a round trip into the way there, the
    pool's decode, compute and encode, the way back and the hand-off, every part non-negative."""
    stream = PoolStream(pool.channel)
    before = time.monotonic()
    future, _ = stream.send(_streamed(_request(pool.held[:2])))
    answer = future.result(timeout=30)
    after = time.monotonic()
    stream.close()
    assert before <= answer.received_ns * 1e-9 <= answer.answered_ns * 1e-9 <= future.arrived_at <= after
    assert answer.answered_ns - answer.received_ns >= (answer.decode_us + answer.compute_us) * 1000

    placement = Placement.spread(ModelConfig.from_file(tiny_fp8), [Pool("pool-0", pool.address)])
    remote = RemoteExperts(placement, "fp32")
    remote.timings = []
    try:
        idx = torch.tensor([pool.held[:4], pool.held[1:5]])  # [T, K], experts pool-0 holds
        remote.start(LAYER, torch.randn(2, 320), idx, torch.full((2, 4), 0.25))()
    finally:
        remote.close()
    (hops,) = [t for t in remote.timings if "pool" in t]
    parts = ("there_s", "decode_s", "compute_s", "pool_encode_s", "back_s", "handoff_s")
    assert all(hops[p] >= 0 for p in parts), hops
    assert sum(hops[p] for p in parts) == pytest.approx(hops["round_trip_s"], abs=1e-6)
