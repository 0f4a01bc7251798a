"""AutoscalerConfig: every autoscaler setting once. Its flags, `expertmesh up`'s and the chart's `autoscaler:`
values derive from these fields (see services/settings.py for the naming rule)."""

from __future__ import annotations

from dataclasses import dataclass

from services.settings import setting
from services.state import DEFAULT_LOAD_WINDOW_S


@dataclass
class AutoscalerConfig:
    autoscale_interval_s: float = setting(5.0, "Seconds between autoscaler checks.")
    load_window_s: float = setting(DEFAULT_LOAD_WINDOW_S, "Seconds of load the autoscaler plans for.")
    rebalance_threshold: float = setting(0.85, "Rebalance when pool balancedness falls below this.")
    hysteresis: float = setting(0.05, "Rebalance only if the plan improves balancedness by this much.")
    rebalance_min_interval_s: float = setting(30.0, "Seconds between rebalances at least.")
    min_tokens: int = setting(1000, "Routed tokens per window (summed over layers) below which load is noise.")
    grace_s: float = setting(2.0, "Seconds pools keep replicas a new placement drops (gateways switch meanwhile).")
    pool_capacity: float = setting(0.0, "Routed tokens/s one pool serves at full load; >0 scales the pool count.")
    scale_up_above: float = setting(0.8, "Add a pool when utilisation stays above this.")
    scale_down_below: float = setting(0.3, "Remove a pool when utilisation stays below this.")
    scale_patience: int = setting(3, "Consecutive checks beyond a threshold before scaling.")
    min_pools: int = setting(1, "Fewest pools when scaling.")
    max_pools: int = setting(16, "Most pools when scaling.")
