"""More torch threads for the stretches of a step where no routed-expert call is out.

With its pools on the same host (`expertmesh up`), the gateway runs on its share of the cores (--threads), so
that the pools keep theirs for the routed experts. But from a step's start to its first expert call (embedding,
the dense layers, the first MoE layer's attention and router) and after its last answer (final norm, lm_head)
the pools wait for the gateway and their cores sit idle: there the gateway may run on `burst` threads (all the
cores). Expert calls out are counted by the model, so with micro-batches a part's dense layers run on the
gateway's own threads while another part's experts are out. Figures: BENCHMARKS.md, distributed serving.
"""

from __future__ import annotations

import torch


class ThreadBurst:
    def __init__(self, burst: int = 0):
        self.burst = burst  # torch threads while no expert call is out; 0: off
        self.calls_out = 0  # routed-expert calls started and not yet answered (every micro-batch's)
        self._base = 0  # the threads to go back to while bursting; 0: not bursting

    def begin(self) -> None:
        """Nothing out from this part of the step: burst, unless another part has calls out."""
        if not self.burst or self.calls_out or self._base:
            return
        base = torch.get_num_threads()
        if base != self.burst:
            self._base = base
            torch.set_num_threads(self.burst)

    def end(self) -> None:
        """A call goes out (or the step's work is done): back to the gateway's own threads."""
        if self._base:
            torch.set_num_threads(self._base)
            self._base = 0
