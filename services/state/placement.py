"""Expert placement: which pools hold a replica of each (layer, logical expert), under a version number.

An expert with several replicas has its tokens split over them by per-replica shares (fractions summing to 1,
in the order of its replicas); an expert without shares splits evenly. The planner sets shares so that a replica
on a pool that also holds other load takes less of its expert.

Gateways and pools hold a copy; every dispatch carries the version it was routed with. `spread` is the static
placement (experts spread evenly over pools); the autoscaler will publish others through the same type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import InvalidRequestError
from services.format.config import ModelConfig

PLACEMENT_SHAPE = (
    'expected {"version": N, "pools": [{"pool_id", "address", "slots"}, ...], '
    '"layers": {"LAYER": [[pool_id, ...] per expert]}, "pinned": [[layer, expert, pool_id], ...], '
    '"shares": {"LAYER": {"EXPERT": [share per replica, ...]}} (optional: experts not listed split evenly)}'
)
SHARE_TOLERANCE = 1e-6  # an expert's shares sum to 1 within this


def layer_balancedness(pool_load) -> float:
    """One layer's pool loads -> mean / max (1.0: perfect; 1.0 with no load)."""
    loads = list(pool_load)
    top = max(loads, default=0.0)
    return sum(loads) / len(loads) / top if top > 0 else 1.0


def default_slots(num_experts: int, replicas: int, pools: int) -> int:
    """Experts per layer a pool may hold when not told: its initial share plus 25% room for redundant replicas."""
    share = -(-num_experts * replicas // pools)
    return min(num_experts, -(-share * 5 // 4))


@dataclass(frozen=True)
class Pool:
    pool_id: str
    address: str  # host:port of its gRPC server
    slots: int = 0  # experts it may hold per layer (0: no limit)


@dataclass
class Placement:
    version: int
    pools: dict[str, Pool]
    # layer -> expert -> pool ids holding a replica
    replicas: dict[int, list[list[str]]] = field(default_factory=dict)
    pinned: set[tuple[int, int, str]] = field(default_factory=set)  # (layer, expert, pool): replicas that stay put
    min_replicas: int = 1  # the redundancy floor every plan keeps where the pools have room (failover without loss)
    # layer -> expert -> share of its tokens per replica (same order as `replicas`); experts not listed: even
    shares: dict[int, dict[int, list[float]]] = field(default_factory=dict)

    @classmethod
    def spread(cls, cfg: ModelConfig, pools: list[Pool], version: int = 1, replicas: int = 1) -> Placement:
        """Every MoE layer's experts (cfg.moe_layers: the MTP layer's too, placed, load-tracked and rebalanced like
        the others) dealt round-robin over the pools, `replicas` copies each on distinct pools."""
        if not pools:
            raise InvalidRequestError("a placement needs at least one pool")
        if not 1 <= replicas <= len(pools):
            raise InvalidRequestError(f"replicas must lie in [1, {len(pools)}] (one per pool at most), got {replicas}")
        ids = [p.pool_id for p in pools]
        table = {
            layer: [[ids[(e + layer + r) % len(ids)] for r in range(replicas)] for e in range(cfg.n_routed_experts)]
            for layer in cfg.moe_layers
        }
        return cls(version, {p.pool_id: p for p in pools}, table, min_replicas=replicas)

    @property
    def layers(self) -> list[int]:
        return sorted(self.replicas)

    @property
    def num_experts(self) -> int:
        return len(next(iter(self.replicas.values()))) if self.replicas else 0

    def pools_for(self, layer: int, expert: int) -> list[str]:
        return self.replicas[layer][expert]

    def shares_of(self, layer: int, expert: int) -> list[float]:
        """The expert's share of its tokens per replica (in `replicas` order): as set, else even."""
        given = self.shares.get(layer, {}).get(expert)
        if given is not None:
            return given
        n = len(self.replicas[layer][expert])
        return [1.0 / n] * n if n else []  # none for an expert left without replicas (its pools drained)

    def set_shares(self, layer: int, shares: list[list[float]]) -> None:
        """One layer's shares, expert -> share per replica; kept only for experts whose split is not even."""
        uneven = {e: [float(x) for x in row] for e, row in enumerate(shares) if not _is_even(row)}
        if uneven:
            self.shares[layer] = uneven
        else:
            self.shares.pop(layer, None)

    def reset_shares(self, layer: int, expert: int) -> None:
        """Even shares for one expert (after its replicas changed)."""
        self.shares.get(layer, {}).pop(expert, None)
        if not self.shares.get(layer, True):
            del self.shares[layer]

    def pool_loads(self, layer: int, tokens) -> dict[str, float]:
        """Expected tokens per pool for one layer: each expert's tokens split over its replicas by their shares."""
        loads = dict.fromkeys(sorted(self.pools), 0.0)
        for e, t in enumerate(tokens):
            for p, share in zip(self.replicas[layer][e], self.shares_of(layer, e)):
                loads[p] += float(t) * share
        return loads

    def balancedness(self, load_by_layer: dict[int, list[float]]) -> float:
        """Mean over layers (with any load) of mean pool load / max pool load: 1.0 is perfect (vLLM's EPLB metric)."""
        values = []
        for layer, tokens in load_by_layer.items():
            loads = list(self.pool_loads(layer, tokens).values())
            if max(loads) > 0:
                values.append(layer_balancedness(loads))
        return sum(values) / len(values) if values else 1.0

    def below_floor(self) -> list[tuple[int, int]]:
        """(layer, expert) with fewer replicas than `min_replicas`: redundancy lost until capacity returns."""
        return [
            (layer, e)
            for layer, experts in sorted(self.replicas.items())
            for e, pools in enumerate(experts)
            if len(pools) < self.min_replicas
        ]

    def experts_on(self, pool_id: str) -> list[tuple[int, int]]:
        return [
            (layer, e)
            for layer, experts in sorted(self.replicas.items())
            for e, pools in enumerate(experts)
            if pool_id in pools
        ]

    def validate(self, layers: list[int], num_experts: int) -> None:
        """Every logical expert keeps a replica, on known pools, at most one per pool; budgets hold."""
        if sorted(self.replicas) != sorted(layers):
            raise InvalidRequestError(
                f"placement covers layers {sorted(self.replicas)}, the MoE layers are {sorted(layers)}"
            )
        for layer, experts in self.replicas.items():
            if len(experts) != num_experts:
                raise InvalidRequestError(
                    f"layer {layer}: placement lists {len(experts)} experts, the model has {num_experts}"
                )
            used = dict.fromkeys(self.pools, 0)
            for e, pools in enumerate(experts):
                if not pools:
                    raise InvalidRequestError(f"layer {layer} expert {e} has no replica")
                unknown = [p for p in pools if p not in self.pools]
                if unknown:
                    raise InvalidRequestError(f"layer {layer} expert {e} is placed on unknown pool {unknown[0]!r}")
                if len(set(pools)) != len(pools):
                    raise InvalidRequestError(f"layer {layer} expert {e} has two replicas on one pool")
                for p in pools:
                    used[p] += 1
            for p, n in used.items():
                if self.pools[p].slots and n > self.pools[p].slots:
                    raise InvalidRequestError(
                        f"pool {p} holds {n} experts of layer {layer}, over its {self.pools[p].slots} slots"
                    )
        for layer, e, p in self.pinned:
            experts = self.replicas.get(layer)
            if experts is None or not 0 <= e < len(experts) or p not in experts[e]:
                raise InvalidRequestError(f"pinned replica of layer {layer} expert {e} on {p} is not in the placement")
        self._validate_shares()

    def _validate_shares(self) -> None:
        """Shares name placed experts, one per replica, each >= 0, summing to 1."""
        for layer, experts in self.shares.items():
            for e, shares in experts.items():
                where = f"layer {layer} expert {e}"
                if layer not in self.replicas or not 0 <= e < len(self.replicas[layer]):
                    raise InvalidRequestError(f"shares given for {where}, which the placement does not have")
                replicas = len(self.replicas[layer][e])
                if len(shares) != replicas:
                    raise InvalidRequestError(f"{where} has {replicas} replicas but {len(shares)} shares")
                if not all(math.isfinite(x) and x >= 0 for x in shares):
                    raise InvalidRequestError(f"{where}: shares must be finite and >= 0, got {shares}")
                if abs(sum(shares) - 1.0) > SHARE_TOLERANCE:
                    raise InvalidRequestError(f"{where}: shares sum to {sum(shares):.9g}, not 1")

    def copy(self) -> Placement:
        return Placement.from_json(self.to_json())

    # ---- serialisation ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "pools": [{"pool_id": p.pool_id, "address": p.address, "slots": p.slots} for p in self.pools.values()],
                "layers": {str(layer): experts for layer, experts in sorted(self.replicas.items())},
                "pinned": sorted([layer, e, p] for layer, e, p in self.pinned),
                "min_replicas": self.min_replicas,
                **({"shares": self._shares_json()} if self.shares else {}),
            }
        )

    def _shares_json(self) -> dict[str, dict[str, list[float]]]:
        return {
            str(layer): {str(e): shares for e, shares in sorted(experts.items())}
            for layer, experts in sorted(self.shares.items())
        }

    @classmethod
    def from_json(cls, text: str) -> Placement:
        try:
            raw = json.loads(text)
            pools = {p["pool_id"]: Pool(p["pool_id"], p["address"], int(p.get("slots", 0))) for p in raw["pools"]}
            replicas = {int(layer): [list(map(str, r)) for r in experts] for layer, experts in raw["layers"].items()}
            pinned = {(int(layer), int(e), str(p)) for layer, e, p in raw.get("pinned", [])}
            shares = {
                int(layer): {int(e): [float(x) for x in row] for e, row in experts.items()}
                for layer, experts in raw.get("shares", {}).items()
            }
            return cls(int(raw["version"]), pools, replicas, pinned, int(raw.get("min_replicas", 1)), shares)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"malformed placement: not JSON: {exc}") from None
        except KeyError as exc:
            raise InvalidRequestError(f"malformed placement: missing key {exc} ({PLACEMENT_SHAPE})") from None
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"malformed placement: {exc} ({PLACEMENT_SHAPE})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        return cls.from_json(Path(path).read_text())


def _is_even(shares: list[float]) -> bool:
    return all(abs(x - 1.0 / len(shares)) <= 1e-12 for x in shares)
