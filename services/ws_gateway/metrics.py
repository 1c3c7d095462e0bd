"""The gateway's Prometheus metrics, in a registry of its own so that several gateways
(tests) can live in one process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class GatewayMetrics:
    def __init__(
        self, connections: Callable[[], float], subscriptions: Callable[[], float]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # An SSE stream holds a place under the same caps as a WebSocket while it is open.
        self.connections = Gauge(
            "longhaul_gateway_connections",
            "Open client connections: WebSocket sessions and SSE streams",
            registry=r,
        )
        self.connections.set_function(connections)
        self.subscriptions = Gauge(
            "longhaul_gateway_subscriptions",
            "Task subscriptions across open connections",
            registry=r,
        )
        self.subscriptions.set_function(subscriptions)
        self.events_relayed = Counter(
            "longhaul_gateway_events_relayed_total",
            "Event frames queued for clients",
            ["source"],
            registry=r,
        )
        # Bound once: labels() per relayed event would cost a lock and a lookup each.
        self.relayed = {
            source: self.events_relayed.labels(source=source)
            for source in ("live", "replay", "snapshot")
        }
        self.drops = Counter(
            "longhaul_gateway_drops_total", "Connections closed for being too slow", registry=r
        )
        self.revoked = Counter(
            "longhaul_gateway_revoked_total",
            "Connections ended because the API key that opened them was revoked",
            registry=r,
        )
        self.refused = Counter(
            "longhaul_gateway_handshakes_refused_total",
            "Handshakes refused",
            ["reason"],
            registry=r,
        )
        self.sweep_rechecks = Counter(
            "longhaul_gateway_sweep_rechecks_total",
            "Subscribers the sweep found behind the database and sent to catch up",
            registry=r,
        )
        self.hub_reconnects = Counter(
            "longhaul_gateway_hub_reconnects_total",
            "Times the Redis subscriber (re)subscribed",
            registry=r,
        )
        self.hub_connected = Gauge(
            "longhaul_gateway_hub_connected",
            "1 while the Redis subscriber is subscribed",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
