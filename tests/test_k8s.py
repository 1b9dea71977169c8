"""KubeRay manifests and Serve configs: valid for Ray's own Serve schema and our app's args,
GPU worker groups for prefill and decode, token auth from Secrets, nothing exposed publicly."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from promql_names import exported_series, metric_names_in
from ray.serve.schema import ServeDeploySchema

from flowprefill_ray.model import ModelConfig
from flowprefill_ray.runtime.decode_worker import kv_pool_blocks
from flowprefill_ray.serve.config import ServeAppArgs

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
SERVE_CONFIGS = [REPO / "deployments" / "local.yaml", REPO / "deployments" / "gpu-cluster.yaml"]
APP_IMPORT_PATH = "flowprefill_ray.serve.app:build_app"
# Where the GPU configs expect the model volume, and the checkpoint they serve from it.
MODEL_MOUNT = "/models"
GPU_MODEL_PATH = "/models/Llama-3.1-8B-Instruct"
# Llama-3.1-8B's shape (its config.json without the weights): what the GPU configs are sized for.
LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


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


@pytest.fixture(scope="module")
def model_volume(tmp_path_factory) -> Path:
    """A stand-in for the /models volume: the 8B checkpoint's config.json, no weights."""
    volume = tmp_path_factory.mktemp("models")
    checkpoint = volume / Path(GPU_MODEL_PATH).relative_to(MODEL_MOUNT)
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    return volume


def on_volume(args: dict, volume: Path) -> dict:
    """``args`` with a model path on /models moved to ``volume`` (the validator checks that
    the checkpoint exists, as it would on the pod where the volume is mounted)."""
    args = copy.deepcopy(args)
    model = args["runtime"]["model"]
    if model["path"].startswith(MODEL_MOUNT + "/"):
        model["path"] = str(volume / Path(model["path"]).relative_to(MODEL_MOUNT))
    return args


def rayservice_args(rayservice: dict, volume: Path) -> ServeAppArgs:
    return ServeAppArgs.model_validate(
        on_volume(serve_config_of(rayservice)["applications"][0]["args"], volume)
    )


def check_serve_config(config: dict, volume: Path) -> ServeAppArgs:
    """Validate with Ray's own schema, then our app's args; returns the parsed args."""
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == APP_IMPORT_PATH
    return ServeAppArgs.model_validate(on_volume(app["args"], volume))


def test_rayservice_is_ray_io_v1_with_a_valid_serve_config(rayservice, model_volume):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    args = check_serve_config(serve_config_of(rayservice), model_volume)
    assert args.runtime.placement.prefill_num_gpus == 1
    assert args.runtime.placement.decode_num_gpus == 1


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_deploy_configs_validate(path, model_volume):
    args = check_serve_config(yaml.safe_load(path.read_text()), model_volume)
    assert args.served_model_name()


def _gpu_configs(rayservice) -> list[dict]:
    gpu_cluster = yaml.safe_load((REPO / "deployments" / "gpu-cluster.yaml").read_text())
    return [
        gpu_cluster["applications"][0]["args"],
        serve_config_of(rayservice)["applications"][0]["args"],
    ]


def test_gpu_configs_serve_the_8b_model_from_the_volume_in_bf16_with_gpu_settings(
    rayservice, model_volume
):
    for raw in _gpu_configs(rayservice):
        assert raw["runtime"]["model"]["path"] == GPU_MODEL_PATH
        args = ServeAppArgs.model_validate(on_volume(raw, model_volume))
        runtime = args.runtime
        assert args.served_model_name() == "Llama-3.1-8B-Instruct"
        assert runtime.model.dtype == "bfloat16" and runtime.model.device == "cuda"
        assert runtime.model.kernels == "triton"
        # Bounded run-ahead on CUDA (auto), and the decode pool sized from GPU memory.
        assert runtime.prefill.sync_mode("cuda") == "bounded"
        assert runtime.decode.kv_blocks == "auto"
        # Prefill and decode packed so the KV hand-off stays on one node where it fits.
        assert runtime.placement.strategy in ("PACK", "STRICT_PACK")
        # The predictor times the longest prompt served instead of extrapolating to it.
        longest = runtime.requests.max_prompt_tokens
        assert longest and max(runtime.prefill.profile_tokens) >= longest


def test_auto_kv_pool_of_the_8b_model_on_an_80gb_gpu_fits_a_full_batch(rayservice, model_volume):
    """What kv_blocks: auto gives on an H100 once the bf16 weights (~16 GB) are loaded: room
    for max_batch_size requests of 1,024 prompt + output tokens, and for the longest one."""
    config = ModelConfig.from_pretrained(model_volume / "Llama-3.1-8B-Instruct")
    free_after_weights = (80 - 16 - 2) * 2**30  # 2 GB for the CUDA context and the step
    for raw in _gpu_configs(rayservice):
        runtime = ServeAppArgs.model_validate(on_volume(raw, model_volume)).runtime
        decode = runtime.decode
        blocks = kv_pool_blocks(config, torch.bfloat16, decode, free_after_weights)
        tokens = blocks * decode.block_size
        assert tokens >= decode.max_batch_size * 1024
        assert tokens >= runtime.requests.max_prompt_tokens + runtime.requests.max_output_tokens


def test_local_config_serves_on_loopback_cpu_only():
    config = yaml.safe_load((REPO / "deployments" / "local.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    args = ServeAppArgs.model_validate(config["applications"][0]["args"])
    assert args.runtime.model.path == "default" and args.runtime.model.device == "cpu"
    assert args.runtime.model.dtype == "float32"  # SmolLM2 answers wrongly in bf16 on CPU
    assert args.runtime.placement.prefill_num_gpus == 0


def _gpu_groups(rayservice: dict) -> list[dict]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (binary suffixes only, as these manifests use)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_head_has_no_gpus_and_workers_request_the_gpus_ray_advertises(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in _gpu_groups(rayservice):
        gpus = group["rayStartParams"]["num-gpus"]
        (container,) = containers_of(group)
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert resources[kind]["nvidia.com/gpu"] == gpus, (group["groupName"], kind)
            assert "cpu" in resources[kind] and "memory" in resources[kind]
        # Guaranteed QoS: what the pod asks for is what it may use.
        assert resources["requests"] == resources["limits"]


def test_one_pod_holds_every_worker_so_the_kv_hand_off_stays_inside_it(rayservice, model_volume):
    """STRICT_PACK places all prefill and decode workers as one placement group on one node:
    the GPU pod must offer exactly their GPUs and CPUs."""
    placement = rayservice_args(rayservice, model_volume).runtime.placement
    assert placement.strategy == "STRICT_PACK"
    (group,) = _gpu_groups(rayservice)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    workers = placement.num_prefill_workers + placement.num_decode_workers
    assert int(group["rayStartParams"]["num-gpus"]) == workers
    bundle_cpus = (
        placement.num_prefill_workers * placement.prefill_num_cpus
        + placement.num_decode_workers * placement.decode_num_cpus
    )
    (container,) = containers_of(group)
    assert bundle_cpus <= float(container["resources"]["limits"]["cpu"])


def _volumes(group: dict) -> dict[str, dict]:
    return {v["name"]: v for v in group["template"]["spec"]["volumes"]}


def _mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_object_store_has_a_memory_backed_dev_shm_within_the_pod_memory(rayservice):
    """Ray's object store carries the default KV hand-off; a container's own /dev/shm is
    64 MiB, so without a memory volume Ray falls back to disk."""
    for group in all_groups(rayservice):
        name = group.get("groupName", "head")
        (container,) = containers_of(group)
        mount = _mounts(container)["/dev/shm"]
        shm = _volumes(group)[mount["name"]]["emptyDir"]
        assert shm["medium"] == "Memory", name
        size = _quantity_bytes(shm["sizeLimit"])
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store <= size, f"{name}: object store larger than /dev/shm"
        # tmpfs pages count against the container's memory limit.
        limit = _quantity_bytes(container["resources"]["limits"]["memory"])
        assert size <= limit / 2, f"{name}: /dev/shm leaves too little memory for the workers"


def test_model_volume_is_mounted_read_only_where_the_config_reads_it(rayservice):
    (claim,) = [d for d in manifests() if d.get("kind") == "PersistentVolumeClaim"]
    for group in all_groups(rayservice):
        (container,) = containers_of(group)
        mount = _mounts(container)[MODEL_MOUNT]
        assert mount["readOnly"] is True
        volume = _volumes(group)[mount["name"]]["persistentVolumeClaim"]
        assert volume["claimName"] == claim["metadata"]["name"] and volume["readOnly"] is True
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # head and GPU pod, maybe two nodes


def test_readiness_probes_use_the_app_health_route_on_gpu_pods_and_gcs_on_the_head(rayservice):
    serve_port = serve_config_of(rayservice)["http_options"]["port"]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    (head_container,) = containers_of(head)
    named = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    # The head must get ready before KubeRay submits the app, so not the app's route.
    assert named[head_container["readinessProbe"]["tcpSocket"]["port"]] == named["gcs-server"]
    for group in _gpu_groups(rayservice):
        (container,) = containers_of(group)
        probe = container["readinessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert probe["path"] == "/health" and ports[probe["port"]] == serve_port
        # /health waits up to 5 s for the scheduler; the probe must wait longer.
        assert container["readinessProbe"]["timeoutSeconds"] > 5


def test_token_auth_is_on_everywhere_with_the_token_from_a_secret(rayservice):
    for group in all_groups(rayservice):
        for container in containers_of(group):
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token
            assert token["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_api_key_variable_reaches_the_pods_from_a_secret(rayservice, model_volume):
    args = rayservice_args(rayservice, model_volume)
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


def test_every_serve_config_autoscales_the_ingress_over_one_engine_service(rayservice):
    """The ingress scales out (at least two replicas where a machine may die: the GPU configs);
    the engine service, which owns the scheduler and the workers, is never replicated."""
    configs = {
        path.name: yaml.safe_load(path.read_text())["applications"][0] for path in SERVE_CONFIGS
    }
    configs["rayservice"] = serve_config_of(rayservice)["applications"][0]
    for name, app in configs.items():
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == {"OpenAIIngress", "EngineService"}, name
        scaling = deployments["OpenAIIngress"]["autoscaling_config"]
        assert "num_replicas" not in deployments["OpenAIIngress"], name  # Serve takes one
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"], name
        assert scaling["min_replicas"] >= (1 if name == "local.yaml" else 2), name
        assert deployments["EngineService"].get("num_replicas", 1) == 1, name
