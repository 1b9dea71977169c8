"""KubeRay manifests and Serve configs: valid for Ray's own Serve schema and our app's args,
GPU worker groups for prefill and decode, token auth from Secrets, nothing exposed publicly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from promql_names import exported_series, metric_names_in
from ray.serve.schema import ServeDeploySchema

from flowprefill_ray.serve.config import ServeAppArgs

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
SERVE_CONFIGS = [REPO / "deployments" / "local.yaml", REPO / "deployments" / "gpu-cluster.yaml"]
APP_IMPORT_PATH = "flowprefill_ray.serve.app:build_app"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += load_all(path)
    return docs


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (doc,) = load_all(K8S / "rayservice.yaml")
    return doc


def serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def all_groups(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def containers_of(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def check_serve_config(config: dict) -> ServeAppArgs:
    """Validate with Ray's own schema, then our app's args; returns the parsed args."""
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == APP_IMPORT_PATH
    return ServeAppArgs.model_validate(app["args"])


def test_rayservice_is_ray_io_v1_with_a_valid_serve_config(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    args = check_serve_config(serve_config_of(rayservice))
    assert args.runtime.placement.prefill_num_gpus == 1
    assert args.runtime.placement.decode_num_gpus == 1


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_deploy_configs_validate(path):
    args = check_serve_config(yaml.safe_load(path.read_text()))
    assert args.served_model_name()


def test_local_config_serves_on_loopback_cpu_only():
    config = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    args = ServeAppArgs.model_validate(config["applications"][0]["args"])
    assert args.runtime.model.path == "default" and args.runtime.model.device == "cpu"
    assert args.runtime.placement.prefill_num_gpus == 0


def test_head_has_no_gpus_and_workers_request_one_gpu_each(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"prefill-gpu", "decode-gpu"} <= set(groups)
    for group in groups.values():
        assert group["rayStartParams"]["num-gpus"] == "1"
        (container,) = containers_of(group)
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert resources[kind]["nvidia.com/gpu"] == "1", (group["groupName"], kind)
            assert "cpu" in resources[kind] and "memory" in resources[kind]


def test_worker_counts_cover_the_placement(rayservice):
    args = ServeAppArgs.model_validate(serve_config_of(rayservice)["applications"][0]["args"])
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    # One prefill worker per GPU: the prefill group has exactly as many GPU pods as workers.
    assert groups["prefill-gpu"]["replicas"] == args.runtime.placement.num_prefill_workers
    assert groups["decode-gpu"]["replicas"] >= args.runtime.placement.num_decode_workers


def test_token_auth_is_on_everywhere_with_the_token_from_a_secret(rayservice):
    for group in all_groups(rayservice):
        for container in containers_of(group):
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token
            assert token["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_api_key_variable_reaches_the_pods_from_a_secret(rayservice):
    args = ServeAppArgs.model_validate(serve_config_of(rayservice)["applications"][0]["args"])
    assert args.api.api_key_env
    for group in all_groups(rayservice):
        for container in containers_of(group):
            env = {e["name"]: e for e in container["env"]}
            assert "secretKeyRef" in env[args.api.api_key_env]["valueFrom"]


_SECRET_NAME = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY|APIKEY)", re.IGNORECASE)


def test_no_secret_values_in_the_repository_manifests():
    for doc in manifests():
        assert doc.get("kind") != "Secret", "Secrets are created with kubectl, not committed"
    for path in [*K8S.rglob("*.yaml"), *SERVE_CONFIGS]:
        for doc in load_all(path):
            for env in _env_entries(doc):
                if _SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{path.name}: {env['name']} has a literal value"


def _env_entries(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("env", "env_vars") and isinstance(value, list):
                yield from (e for e in value if isinstance(e, dict) and "name" in e)
            elif key == "env_vars" and isinstance(value, dict):
                yield from ({"name": k, "value": v} for k, v in value.items())
            else:
                yield from _env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_entries(item)


def test_nothing_is_exposed_outside_the_cluster(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    for doc in manifests():
        assert doc.get("kind") not in ("Ingress", "Route", "Gateway")
        if doc.get("kind") == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    exposed = [v for doc in manifests() for v in _service_types(doc)]
    assert not {"LoadBalancer", "NodePort"} & set(exposed), exposed
    # A Service spec the RayService may carry for Serve must be ClusterIP too.
    serve_service = rayservice["spec"].get("serveService")
    if serve_service:
        assert serve_service["spec"].get("type", "ClusterIP") == "ClusterIP"


def _service_types(node):
    """Every ``type`` / ``serviceType`` value anywhere in a manifest (nested Service specs)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("type", "serviceType") and isinstance(value, str):
                yield value
            else:
                yield from _service_types(value)
    elif isinstance(node, list):
        for item in node:
            yield from _service_types(item)


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod(rayservice):
    (monitor,) = load_all(K8S / "podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for group in all_groups(rayservice):
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), "PodMonitor does not select this group"
        port = int(group["rayStartParams"]["metrics-export-port"])
        (container,) = containers_of(group)
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named[endpoint["port"]] == port


def _alerts() -> list[dict]:
    (rule,) = load_all(K8S / "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_alerts_cover_slo_attainment_queues_errors_and_scraping_with_exported_metrics():
    # What each alert shows on recorded samples is checked in test_dashboard.py.
    allowed = exported_series() | {"up"}  # Prometheus' own per-target series
    read: set[str] = set()
    for alert in _alerts():
        names = metric_names_in(alert["expr"])
        assert names and names <= allowed, (alert["alert"], names - allowed)
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]
        read |= names
    assert "ray_flowprefill_slo_missed_total" in read
    assert "ray_flowprefill_prefill_requests_waiting" in read
    assert "ray_flowprefill_requests_finished_total" in read and "up" in read
    exprs = " ".join(a["expr"] for a in _alerts())
    assert 'finish_reason=~"error|timeout"' in exprs and "absent(" in exprs


def test_scrape_alerts_select_the_job_the_podmonitor_gives_the_pods(rayservice):
    (monitor,) = load_all(K8S / "podmonitor.yaml")
    job_label = monitor["spec"]["jobLabel"]
    jobs = {group["template"]["metadata"]["labels"][job_label] for group in all_groups(rayservice)}
    (job,) = jobs
    for alert in _alerts():
        if "up" in metric_names_in(alert["expr"]):
            assert f'up{{job="{job}"}}' in alert["expr"], alert["alert"]


# --------------------------------------------------------------------- network policy
#
# Who may connect to which port of the Ray pods, by Kubernetes' NetworkPolicy rules (ingress;
# podSelector/namespaceSelector peers with matchLabels; numbered or named ports), on the ports
# k8s/rayservice.yaml actually uses.

NAMESPACE = "default"  # where the RayService runs in these checks
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
OPERATOR = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
STRANGER = (NAMESPACE, {"app.kubernetes.io/name": "something-else"})
RANDOM_RAY_PORT = 43117  # raylet, object manager, worker and Serve replica gRPC ports are random


def network_policies() -> list[dict]:
    return [doc for doc in manifests() if doc.get("kind") == "NetworkPolicy"]


def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels is modelled here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, source: tuple[str, dict]) -> bool:
    namespace, labels = source
    assert "ipBlock" not in peer, "ipBlock peers are not modelled here"
    if "namespaceSelector" in peer:
        namespace_labels = {"kubernetes.io/metadata.name": namespace}
        if not _selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace != NAMESPACE:  # a podSelector alone means the policy's own namespace
        return False
    return "podSelector" not in peer or _selects(peer["podSelector"], labels)


def _port_admits(entry: dict, port: int, named: dict[str, int]) -> bool:
    assert entry.get("protocol", "TCP") == "TCP"
    wanted = entry["port"]
    number = named.get(wanted) if isinstance(wanted, str) else wanted
    return number is not None and number <= port <= entry.get("endPort", number)


def admitted(source: tuple[str, dict], group: dict, port: int) -> bool:
    """Whether ``source`` (namespace, pod labels) may open ``port`` on a pod of ``group``."""
    labels = group["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for c in containers_of(group) for p in c["ports"]}
    selecting = [
        policy
        for policy in network_policies()
        if _selects(policy["spec"]["podSelector"], labels)
        and "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True  # not isolated: everything is admitted
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers, ports = rule.get("from", []), rule.get("ports", [])
            if peers and not any(_peer_admits(peer, source) for peer in peers):
                continue
            if ports and not any(_port_admits(entry, port, named) for entry in ports):
                continue
            return True
    return False


def _cluster_pod(group: dict) -> tuple[str, dict]:
    return NAMESPACE, group["template"]["metadata"]["labels"]


def test_network_policies_parse_and_isolate_every_ray_pod(rayservice):
    policies = network_policies()
    assert policies
    for policy in policies:
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    for group in all_groups(rayservice):
        # Isolated: a pod outside the cluster cannot reach a Ray port.
        assert not admitted(STRANGER, group, RANDOM_RAY_PORT), group.get("groupName", "head")


def test_ray_ports_are_open_only_to_the_ray_cluster_itself(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    (head_container,) = containers_of(head)
    head_ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    internal = [head_ports["gcs-server"], head_ports["client"], RANDOM_RAY_PORT]
    groups = all_groups(rayservice)
    for group in groups:
        ports = internal if group is head else [RANDOM_RAY_PORT]
        for port in ports:
            assert all(admitted(_cluster_pod(peer), group, port) for peer in groups), port
            for outsider in (STRANGER, PROMETHEUS, OPERATOR):
                assert not admitted(outsider, group, port), (outsider, port)


def test_metrics_port_is_open_to_prometheus_only(rayservice):
    for group in all_groups(rayservice):
        port = int(group["rayStartParams"]["metrics-export-port"])
        assert admitted(PROMETHEUS, group, port)
        assert not admitted(STRANGER, group, port) and not admitted(OPERATOR, group, port)


def test_dashboard_is_open_to_the_kuberay_operator_only(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    (container,) = containers_of(head)
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["dashboard"]
    assert admitted(OPERATOR, head, port)
    assert not admitted(STRANGER, head, port) and not admitted(PROMETHEUS, head, port)


def test_serve_http_port_is_open_to_clients(rayservice):
    port = serve_config_of(rayservice)["http_options"]["port"]
    # proxy_location EveryNode: a Serve proxy listens on every node.
    for group in all_groups(rayservice):
        assert admitted(STRANGER, group, port)
