"""Prometheus metrics: /metrics parses with prometheus-client's own parser, counts exactly what a
test did, and never carries a key or a path as a label."""

from __future__ import annotations

import os
import re
import socket
import urllib.request

from conftest import vae_config
from prometheus_client.parser import text_string_to_metric_families

from cached_client import ImageSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(address: str) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for family in samples.values() for s in family
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_exactly_the_hits_a_client_made(daemon_factory, tiny_vae, images):
    address = f"127.0.0.1:{free_port()}"
    config = vae_config(tiny_vae)
    config["server"] = {"metrics": address}
    d = daemon_factory(config)
    client = d.client()
    specs = [ImageSpec(p, (32, 32)) for p in images[:5]]
    client.warm(specs, "vae")  # 5 misses, computed
    before = scrape(address)
    assert value(before, "cached_hits_total", tier="shm") == 0
    assert value(before, "cached_computed_total") == 5
    held = client.get(specs, "vae")  # 5 hits from shared memory, leased by this process
    client.close()
    client.get(specs[:3], "vae")
    after = scrape(address)
    assert value(after, "cached_hits_total", tier="shm") == 5  # the second get came from the handle cache
    pid = str(os.getpid())
    assert value(after, "cached_client_items_total", pid=pid) == 5
    assert value(after, "cached_client_leases", pid=pid) == 5
    assert value(after, "cached_client_leased_bytes", pid=pid) > 0
    assert value(after, "cached_tier_entries", tier="shm") == 5
    assert value(after, "cached_encode_batch_size_count", encoder="vae") >= 1
    assert value(after, "cached_encode_batch_size_sum", encoder="vae") == 5
    assert value(after, "cached_request_seconds_count", method="Get") == 1
    assert value(after, "cached_request_seconds_count", method="Warm") == 1
    labels = {v for family in after.values() for s in family for v in s.labels.values()}
    assert not [v for v in labels if "/" in v or re.fullmatch(r"[0-9a-f]{16,}", v)]  # no paths, no keys
    del held


def test_the_grafana_dashboard_uses_only_metrics_the_daemon_exports():
    import json

    from cached.server import metrics

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "deploy", "grafana", "cached-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(cached_[a-z_]+)", e)}
    documented = set(re.findall(r"\b(cached_[a-z_]+)", metrics.__doc__ or ""))
    base = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in used}
    assert base <= {re.sub(r"_total$", "", m) for m in documented} | {"cached_tier_bytes", "cached_tier_capacity_bytes"}
