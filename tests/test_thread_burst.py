"""The gateway's burst threads (services/gateway/thread_burst.py): more torch threads while no routed-expert call
is out, its own threads while one is, and the same tokens either way."""

from __future__ import annotations

import pytest
import torch

from services.attention.kv_cache import PagedLatentCache
from services.gateway.config import GatewayConfig
from services.gateway.engine import Engine
from services.gateway.requests import Request
from services.gateway.sampling import SamplingParams
from services.gateway.serving import ServingCore
from services.gateway.thread_burst import ThreadBurst


class ThreadsSeen:
    """The engine's real in-process experts, with the torch threads noted when each call starts and is waited
    for, and when the router of each MoE layer has run (the routing observer)."""

    def __init__(self, experts):
        self.experts = experts
        self.at_start: list[int] = []
        self.at_wait: list[int] = []
        self.at_router: list[tuple[int, int]] = []

    def start(self, layer, hidden, topk_idx, topk_w):
        self.at_start.append(torch.get_num_threads())
        pending = self.experts.start(layer, hidden, topk_idx, topk_w)

        def wait():
            self.at_wait.append(torch.get_num_threads())
            return pending()

        return wait

    def observe(self, layer: int, topk_idx: torch.Tensor) -> None:
        self.at_router.append((layer, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _generate(engine: Engine, micro_batches: int, burst: int, seen: ThreadsSeen | None = None) -> list[list[int]]:
    model = engine.model
    saved = model.experts, model.routing_observer, model.threads
    if seen is not None:
        model.experts, model.routing_observer = seen, seen.observe
    model.threads = ThreadBurst(burst)
    try:
        core = ServingCore(
            model, PagedLatentCache(engine.cfg, num_blocks=32, block_size=16), micro_batches=micro_batches
        )
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        reqs = [Request([(7 * i + 3 * n) % 1000 + 2 for i in range(n)], params) for n in (5, 17, 9, 12)]
        for r in reqs:
            core.submit(r)
        core.run_until_idle()
        return [r.output for r in reqs]
    finally:
        model.experts, model.routing_observer, model.threads = saved


def test_expert_calls_run_on_the_gateways_own_threads_and_the_rest_bursts(engine_tiny, one_thread):
    seen = ThreadsSeen(engine_tiny.model.experts)
    tokens = _generate(engine_tiny, 1, 2, seen)
    assert tokens == _generate(engine_tiny, 1, 0)
    assert torch.get_num_threads() == 1  # every step gives its threads back
    moe = engine_tiny.cfg.moe_layers  # tiny: layer 0 dense, 1 and 2 MoE
    assert seen.at_start and set(seen.at_start) == {1} and set(seen.at_wait) == {1}
    first, later = moe[0], moe[1:]
    assert {n for layer, n in seen.at_router if layer == first} == {2}  # the first MoE layer's router: bursting
    assert {n for layer, n in seen.at_router if layer in later} == {1}  # after a call went out: own threads


def test_with_micro_batches_a_part_bursts_only_while_no_other_part_has_a_call_out(engine_tiny, one_thread):
    seen = ThreadsSeen(engine_tiny.model.experts)
    tokens = _generate(engine_tiny, 2, 2, seen)
    assert tokens == _generate(engine_tiny, 2, 0) == _generate(engine_tiny, 1, 0)
    assert set(seen.at_start) == {1} and torch.get_num_threads() == 1
    first = engine_tiny.cfg.moe_layers[0]
    routers = [n for layer, n in seen.at_router if layer == first]
    # every step: the first part reaches its first MoE router with nothing out (burst), the second part with the
    # first part's call out (its own thread); steps with one chunk have one part
    assert 2 in routers and 1 in routers


def test_burst_off_or_equal_to_the_threads_changes_nothing(one_thread):
    for burst in (0, 1):
        threads = ThreadBurst(burst)
        threads.begin()
        assert torch.get_num_threads() == 1
        threads.end()
    threads = ThreadBurst(2)
    threads.calls_out = 1
    threads.begin()  # a call is out: no burst
    assert torch.get_num_threads() == 1
    threads.calls_out = 0
    threads.begin()
    assert torch.get_num_threads() == 2
    threads.begin()  # already bursting: keeps the threads to go back to
    threads.end()
    assert torch.get_num_threads() == 1


def test_negative_thread_counts_are_refused_by_name():
    with pytest.raises(ValueError, match="burst_threads must be >= 0"):
        GatewayConfig(burst_threads=-1)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        GatewayConfig(threads=-2)
