"""Expert placement: which pools hold a replica of each (layer, logical expert), under a version number.

Gateways and pools hold a copy; every dispatch carries the version it was routed with. `spread` is the static
placement (experts spread evenly over pools); the autoscaler will publish others through the same type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import ModelConfig
from services.common.errors import InvalidRequestError


@dataclass(frozen=True)
class Pool:
    pool_id: str
    address: str  # host:port of its gRPC server


@dataclass
class Placement:
    version: int
    pools: dict[str, Pool]
    # layer -> expert -> pool ids holding a replica (first = preferred)
    replicas: dict[int, list[list[str]]] = field(default_factory=dict)

    @classmethod
    def spread(cls, cfg: ModelConfig, pools: list[Pool], version: int = 1, replicas: int = 1) -> "Placement":
        """Every MoE layer's experts dealt round-robin over the pools, `replicas` copies each on distinct pools."""
        if not pools:
            raise InvalidRequestError("a placement needs at least one pool")
        if not 1 <= replicas <= len(pools):
            raise InvalidRequestError(f"replicas must lie in [1, {len(pools)}] (one per pool at most), got {replicas}")
        ids = [p.pool_id for p in pools]
        table = {layer: [[ids[(e + layer + r) % len(ids)] for r in range(replicas)] for e in range(cfg.n_routed_experts)]
                 for layer in cfg.moe_layers}
        return cls(version, {p.pool_id: p for p in pools}, table)

    def pools_for(self, layer: int, expert: int) -> list[str]:
        return self.replicas[layer][expert]

    def experts_on(self, pool_id: str) -> list[tuple[int, int]]:
        return [(layer, e) for layer, experts in sorted(self.replicas.items())
                for e, pools in enumerate(experts) if pool_id in pools]

    def validate(self, cfg: ModelConfig) -> None:
        if sorted(self.replicas) != cfg.moe_layers:
            raise InvalidRequestError(f"placement covers layers {sorted(self.replicas)}, the model's MoE layers are {cfg.moe_layers}")
        for layer, experts in self.replicas.items():
            if len(experts) != cfg.n_routed_experts:
                raise InvalidRequestError(f"layer {layer}: placement lists {len(experts)} experts, the model has {cfg.n_routed_experts}")
            for e, pools in enumerate(experts):
                if not pools:
                    raise InvalidRequestError(f"layer {layer} expert {e} has no replica")
                unknown = [p for p in pools if p not in self.pools]
                if unknown:
                    raise InvalidRequestError(f"layer {layer} expert {e} is placed on unknown pool {unknown[0]!r}")

    # ---- serialisation ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "version": self.version,
            "pools": [{"pool_id": p.pool_id, "address": p.address} for p in self.pools.values()],
            "layers": {str(layer): experts for layer, experts in sorted(self.replicas.items())},
        })

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        try:
            raw = json.loads(text)
            pools = {p["pool_id"]: Pool(p["pool_id"], p["address"]) for p in raw["pools"]}
            replicas = {int(layer): [list(map(str, r)) for r in experts] for layer, experts in raw["layers"].items()}
            return cls(int(raw["version"]), pools, replicas)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"malformed placement: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        return cls.from_json(Path(path).read_text())
