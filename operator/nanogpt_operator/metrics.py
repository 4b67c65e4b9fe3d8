"""The operator's own Prometheus metrics, on a registry it owns (never the global one).

Names follow Prometheus conventions under `nanogpt_operator_`; manifests/monitoring's alerts
read `rollbacks`, `rollouts` and `reconciles`, and tests/monitoring checks those names against
what a registry built here exports.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter("nanogpt_operator_reconciles", "reconciles by kind and result (ok | error)",
                                  ["kind", "result"], registry=r)
        self.drift_repairs = Counter("nanogpt_operator_drift_repairs", "children patched back to their spec",
                                     ["kind"], registry=r)
        self.rollbacks = Counter("nanogpt_operator_rollbacks",
                                 "automatic rollbacks of a NanoGPTModel to its previous checkpoint",
                                 ["namespace", "name"], registry=r)
        self.rollout_waves = Counter("nanogpt_operator_rollout_waves", "NanoGPTRollout waves by result",
                                     ["namespace", "name", "result"], registry=r)
        self.rollouts = Counter("nanogpt_operator_rollouts",
                                "finished NanoGPTRollouts by outcome (succeeded | failed | reverted)",
                                ["namespace", "name", "outcome"], registry=r)
        for kind in ("NanoGPTModel", "NanoGPTRollout"):  # zero series from the start, for rate()
            for result in ("ok", "error"):
                self.reconciles.labels(kind=kind, result=result)
            self.drift_repairs.labels(kind=kind)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics on its own thread; returns (server, thread) for shutdown."""
        return start_http_server(port, addr=addr, registry=self.registry)


def shared_metrics(memo: Any) -> OperatorMetrics:
    """The one OperatorMetrics of this operator process, kept in kopf's memo (both controllers count into it)."""
    if "metrics" not in memo:
        memo.metrics = OperatorMetrics()
    metrics: OperatorMetrics = memo.metrics
    return metrics
