"""The deployment files agree with each other and with the server: Prometheus scrapes every
app instance of the compose file directly, and the PromQL the docs show only names metric
families the server exports."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT, LiveServer, scrape_metrics

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())


def app_services() -> set[str]:
    return {name for name, spec in COMPOSE["services"].items()
            if spec.get("image") == "model-server:local"}


def test_prometheus_scrapes_every_instance_directly() -> None:
    targets = {target for job in PROMETHEUS["scrape_configs"]
               for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"{name}:8000" for name in app_services()} and len(targets) >= 2
    mounted = COMPOSE["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounted


def test_the_documented_queries_name_exported_metrics(live_server: LiveServer) -> None:
    page = (ROOT / "docs" / "operations.md").read_text()
    queries = "\n".join(re.findall(r"```promql\n(.*?)```", page, re.S))
    assert queries.count("\n") >= 2
    live_server.post("/predict/iris", json=[5.1, 3.5, 1.4, 0.2])
    live_server.post("/predict/nope", json=[1.0])
    exported = set(re.findall(r"^([a-z_]+)(?:\{| )", scrape_metrics(live_server), re.M))
    named = set(re.findall(r"\b([a-z]+(?:_[a-z]+)+)\[", queries)) | set(
        re.findall(r"rate\(([a-z_]+)", queries))
    assert named and named <= exported, named - exported
