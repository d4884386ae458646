"""deploy/ is applied as it is: every manifest is valid, and the files agree with each other and
with the worker (no cluster, no Docker, no network).

Why these tools: kubeconform is a Go binary on no registry this project may use (PyPI, npm,
Debian), and it fetches its schemas at run time. kubernetes-validate ships the Kubernetes
OpenAPI schemas of every release in its wheel, so each object is checked offline, strictly (an
unknown or misspelt field fails), against the oldest release we support and the newest it
knows. check-jsonschema ships the Compose specification's schema. The ServiceMonitor is a CRD
neither knows: its fields that matter are checked by hand. What no schema can see (the Secret's
key name against the env ref, probe paths against the routes the worker serves, the grace period
against the drain timeout, the ConfigMap against the settings loader) is checked here too, with
the real loader and a real ops server on loopback.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from goflow_gpu.errors import ConfigError
from goflow_gpu.health import Readiness, start_ops_server
from goflow_gpu.metrics import Metrics
from goflow_gpu.settings import Settings, load_settings
from tests.test_dockerfile import DOCKERFILE, env_vars, only, parse

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"

#: The oldest Kubernetes release the manifests must apply to, and the newest the schemas know.
KUBE_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
#: Stands in for the Secret's value when the tests resolve the pod's environment. Made up.
MADE_UP_KEY = "made-up-deploy-key-0016"


# -- loading ------------------------------------------------------------------------------------


def read_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def kustomization() -> dict[str, Any]:
    (doc,) = read_yaml_documents(KUBE / "kustomization.yaml")
    return doc


def applied_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` sends: each listed file's objects, put in the
    kustomization's namespace (its only transformation; the kubectl test checks that)."""
    spec = kustomization()
    objects = []
    for name in spec["resources"]:
        for doc in read_yaml_documents(KUBE / name):
            doc = copy.deepcopy(doc)
            doc["metadata"].setdefault("namespace", spec["namespace"])
            objects.append(doc)
    return objects


def the(kind: str) -> dict[str, Any]:
    found = [o for o in applied_objects() if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def secret_example() -> dict[str, Any]:
    (doc,) = read_yaml_documents(KUBE / "secret.example.yaml")
    return doc


def worker_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = the("StatefulSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: the worker"
    return containers[0]


def compose_worker() -> dict[str, Any]:
    (doc,) = read_yaml_documents(COMPOSE)
    return dict(doc["services"]["worker"])


def image_env() -> dict[str, str]:
    """The ENV of Dockerfile.cuda: what a container has before the orchestrator adds its own."""
    return env_vars(parse(DOCKERFILE.read_text(encoding="utf-8")))


def pod_env() -> dict[str, str]:
    """The worker container's environment as the kubelet builds it (the Secret's value made up)."""
    env = image_env()
    for item in worker_container()["env"]:
        if "valueFrom" in item:
            assert item["valueFrom"]["secretKeyRef"]["name"] == secret_example()["metadata"]["name"]
            env[item["name"]] = MADE_UP_KEY
        else:
            env[item["name"]] = item["value"]
    return env


def compose_env() -> dict[str, str]:
    env = image_env()
    for name, value in compose_worker()["environment"].items():
        env[name] = MADE_UP_KEY if name == "GOFLOW_API_KEY" else str(value)
    return env


def settings_under(env: dict[str, str], config: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Load ``config`` exactly as the worker in that container would, environment included: an
    unknown ``GOFLOW_*`` name or YAML key fails here as it would at the pod's start (exit 2)."""
    for name in list(os.environ):
        if name.upper().startswith("GOFLOW_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("GOFLOW_"):
            monkeypatch.setenv(name, value)
    return load_settings(config)


def config_arg(args: list[str]) -> str:
    assert "--config" in args, args
    return args[args.index("--config") + 1]


def duration_seconds(text: str) -> int:
    """A Compose duration ("75s", "1m15s") in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert match and text, f"not a duration: {text!r}"
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def expected_grace_period() -> int:
    """docs/OPERATIONS.md ("Stopping"), written out by hand: drain_timeout + the result POST
    timeout (30 s) + the engine's shutdown (about 10 s) + a 15 s margin."""
    drain: float = Settings.model_fields["drain_timeout"].default
    return math.ceil(drain + 30 + 10 + 15)


# -- Kubernetes: the kustomization and the schemas ----------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    spec = kustomization()
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert spec["kind"] == "Kustomization"
    assert set(spec) <= {"apiVersion", "kind", "namespace", "resources"}, set(spec)
    on_disk = {p.name for p in KUBE.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(spec["resources"]) == on_disk - {"secret.example.yaml"}
    kinds = sorted(o["kind"] for o in applied_objects())
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
        "StatefulSet",
    ]
    assert "Secret" not in kinds  # the key never comes from a file of this repository


def core_objects() -> list[dict[str, Any]]:
    """Every object of a built-in kind (the ServiceMonitor is a CRD, checked by hand below)."""
    objects = [o for o in applied_objects() if o["kind"] != "ServiceMonitor"]
    return [*objects, secret_example()]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    for obj in core_objects():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")


@pytest.mark.parametrize(
    ("break_it", "field"),
    [
        (lambda c: c["livenessProbe"]["httpGet"].update(paths="/healthz"), "paths"),
        (lambda c: c["ports"][0].update(containerPort="9108"), "containerPort"),
        (lambda c: c.update(evn=[]), "evn"),
    ],
    ids=["misspelt-field", "wrong-type", "unknown-container-field"],
)
def test_the_schema_check_refuses_a_broken_statefulset(break_it: Any, field: str) -> None:
    """The validator is live: a typo a person could make in the StatefulSet fails it."""
    statefulset = copy.deepcopy(the("StatefulSet"))
    break_it(statefulset["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(statefulset, KUBE_VERSIONS[0], strict=True)
    assert field in str(caught.value.message) + str(list(caught.value.path))


def test_kubectl_kustomize_renders_exactly_these_objects() -> None:
    """The kustomization builds with the real kustomize (kubectl's, offline), into the objects
    the other tests check: no file missing, no transformation they do not know about."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is part of the machine image CI runs on; it is missing")
        pytest.skip("kubectl not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    built = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return (obj["kind"], obj["metadata"]["name"])

    assert sorted(built, key=key) == sorted(applied_objects(), key=key)


# -- Kubernetes: the facts that tie the files together ------------------------------------------


def service_monitor_problems(monitor: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    """What would make the Prometheus Operator refuse the ServiceMonitor, or scrape nothing."""
    problems = []
    if monitor.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {monitor.get('apiVersion')!r}")
    spec = monitor.get("spec", {})
    known = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
    problems += [f"unknown spec field {name!r}" for name in set(spec) - known]
    wanted = spec.get("selector", {}).get("matchLabels", {})
    # A ServiceMonitor selects Services (by their labels), not pods, in its own namespace.
    selected = [
        s
        for s in services
        if wanted
        and wanted.items() <= s["metadata"].get("labels", {}).items()
        and s["metadata"].get("namespace") == monitor["metadata"].get("namespace")
    ]
    if not selected:
        problems.append(f"selector {wanted} matches no Service")
    duration = re.compile(r"(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")
    endpoint_fields = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
    for endpoint in spec.get("endpoints") or [None]:
        if endpoint is None:
            problems.append("no endpoints")
            continue
        problems += [f"unknown endpoint field {n!r}" for n in set(endpoint) - endpoint_fields]
        for service in selected:
            names = {p.get("name") for p in service["spec"]["ports"]}
            if endpoint.get("port") not in names:
                problems.append(f"port {endpoint.get('port')!r} is not a port name of the Service")
        seconds = {}
        for name in ("interval", "scrapeTimeout"):
            value = endpoint.get(name, "")
            match = duration.fullmatch(value)
            if not value or not match:
                problems.append(f"{name} {value!r} is not a Prometheus duration")
                continue
            h, m, s, ms = (int((g or "0").rstrip("hms")) for g in match.groups())
            seconds[name] = h * 3600 + m * 60 + s + ms / 1000
        if len(seconds) == 2 and seconds["scrapeTimeout"] > seconds["interval"]:
            problems.append("scrapeTimeout above interval (Prometheus refuses it)")
    return problems


def test_service_monitor_scrapes_the_metrics_port_of_the_service() -> None:
    services = [o for o in applied_objects() if o["kind"] == "Service"]
    monitor = the("ServiceMonitor")
    assert service_monitor_problems(monitor, services) == []
    # The hand check can fail: each of these breaks it.
    wrong_port = copy.deepcopy(monitor)
    wrong_port["spec"]["endpoints"][0]["port"] = "http"
    assert service_monitor_problems(wrong_port, services) == [
        "port 'http' is not a port name of the Service"
    ]
    wrong_labels = copy.deepcopy(monitor)
    wrong_labels["spec"]["selector"]["matchLabels"] = {"app": "goflow"}
    assert service_monitor_problems(wrong_labels, services) == [
        "selector {'app': 'goflow'} matches no Service"
    ]
    slow = copy.deepcopy(monitor)
    slow["spec"]["endpoints"][0].update(interval="5s", scrapeTimeout="10s")
    assert service_monitor_problems(slow, services) == [
        "scrapeTimeout above interval (Prometheus refuses it)"
    ]


def test_selectors_bind_the_statefulset_its_service_and_the_budget() -> None:
    statefulset, service, budget = the("StatefulSet"), the("Service"), the("PodDisruptionBudget")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for what, selector in (
        ("StatefulSet", statefulset["spec"]["selector"]["matchLabels"]),
        ("Service", service["spec"]["selector"]),
        ("PodDisruptionBudget", budget["spec"]["selector"]["matchLabels"]),
    ):
        assert selector and selector.items() <= pod_labels.items(), what
    # The governing Service of a StatefulSet is headless; its metrics port is the pod's.
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True  # unready pods are scraped too
    (port,) = service["spec"]["ports"]
    (container_port,) = worker_container()["ports"]
    assert port["targetPort"] == container_port["name"] == "metrics"
    assert port["port"] == container_port["containerPort"]
    # One voluntary disruption at a time, and never a budget that blocks draining a node.
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_api_key_comes_from_the_secret_and_only_from_it() -> None:
    example = secret_example()
    (ref,) = [e for e in worker_container()["env"] if e["name"] == "GOFLOW_API_KEY"]
    assert "value" not in ref
    assert ref["valueFrom"]["secretKeyRef"] == {
        "name": example["metadata"]["name"],
        "key": next(iter(example["stringData"])),
    }
    assert list(example["stringData"]) == ["api-key"]
    # Every documented `kubectl create secret` makes that Secret with that key.
    command = re.compile(
        r"create secret generic ([\w.-]+)\s*\\?\s*--from-literal=([\w.-]+)=\"\$GOFLOW_API_KEY\""
    )
    documents = [OPERATIONS, KUBE / "kustomization.yaml", KUBE / "secret.example.yaml"]
    for path in documents:
        text = re.sub(r"\n\s*#", "\n", path.read_text(encoding="utf-8"))
        found = command.findall(text)
        assert found, f"{path.name} does not say how to create the Secret"
        assert set(found) == {("goflow-gpu-api-key", "api-key")}, (path.name, found)


def test_the_configmap_loads_with_the_settings_and_matches_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod starts: its config file and environment pass the settings loader (no unknown key,
    no unknown GOFLOW_* variable), and the settings point at the volumes and the port the
    manifests give it."""
    container = worker_container()
    config_map = the("ConfigMap")
    (volume,) = [
        v
        for v in the("StatefulSet")["spec"]["template"]["spec"]["volumes"]
        if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]
    ]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    config_path = Path(config_arg(container["args"]))
    assert config_path.parent == Path(mount["mountPath"])
    assert mount.get("readOnly") is True
    config = tmp_path / config_path.name
    config.write_text(config_map["data"][config_path.name], encoding="utf-8")

    settings = settings_under(pod_env(), config, monkeypatch)
    assert settings.api_key is not None and settings.api_key.get_secret_value() == MADE_UP_KEY
    mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
    assert settings.state_dir == mounts["state"]
    assert Path(pod_env()["HF_HOME"]) == mounts["hf"]
    claims = {c["metadata"]["name"] for c in the("StatefulSet")["spec"]["volumeClaimTemplates"]}
    assert claims == {"state", "hf"}  # both outlive the pod, one per pod
    (port,) = container["ports"]
    assert settings.metrics_port == port["containerPort"]
    assert settings.metrics_host == "0.0.0.0"  # the kubelet probes the pod's IP, not loopback
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == settings.tensor_parallel_size * settings.data_parallel_size
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    # The ConfigMap is configs/h100-7b.yaml; the two must not drift apart.
    assert settings == settings_under(pod_env(), ROOT / "configs" / "h100-7b.yaml", monkeypatch)


def test_grace_period_is_derived_from_the_drain_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert expected_grace_period() == 75  # 20 + 30 + 10 + 15, as docs/OPERATIONS.md says
    pod = the("StatefulSet")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == expected_grace_period()
    assert duration_seconds(compose_worker()["stop_grace_period"]) == expected_grace_period()
    assert compose_worker()["stop_signal"] == "SIGTERM"
    # Derived from the default: the deployed configs must leave drain_timeout at it.
    config = tmp_path / "goflow.yaml"
    config.write_text(the("ConfigMap")["data"]["goflow.yaml"], encoding="utf-8")
    default = Settings.model_fields["drain_timeout"].default
    assert settings_under(pod_env(), config, monkeypatch).drain_timeout == default
    compose_config = ROOT / "configs" / Path(config_arg(compose_worker()["command"])).name
    assert settings_under(compose_env(), compose_config, monkeypatch).drain_timeout == default


def test_pod_runs_as_the_images_user_with_a_memory_backed_dev_shm() -> None:
    pod = the("StatefulSet")["spec"]["template"]["spec"]
    runs = " ".join(
        i.args for i in parse(DOCKERFILE.read_text(encoding="utf-8")) if i.name == "RUN"
    )
    uid = int(re.search(r"useradd\b.*--uid (\d+)", runs).group(1))  # type: ignore[union-attr]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == uid
    assert worker_container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert worker_container()["securityContext"]["capabilities"]["drop"] == ["ALL"]
    (dshm,) = [v for v in pod["volumes"] if "emptyDir" in v]
    assert dshm["emptyDir"]["medium"] == "Memory"
    assert {"name": dshm["name"], "mountPath": "/dev/shm"} in worker_container()["volumeMounts"]


def test_service_links_stay_off_since_the_worker_refuses_their_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With service links on, the kubelet gives a pod <SERVICE>_SERVICE_HOST, <SERVICE>_PORT...
    for each Service of the namespace that has a cluster IP: a Service named goflow-gpu yields
    GOFLOW_GPU_*, which the worker refuses as unknown settings, so the pod would exit 2."""
    config = tmp_path / "goflow.yaml"
    config.write_text(the("ConfigMap")["data"]["goflow.yaml"], encoding="utf-8")
    injected = {
        "GOFLOW_GPU_SERVICE_HOST": "192.0.2.7",
        "GOFLOW_GPU_SERVICE_PORT": "9108",
        "GOFLOW_GPU_PORT": "tcp://192.0.2.7:9108",
    }
    with pytest.raises(ConfigError, match="GOFLOW_GPU_SERVICE_HOST"):
        settings_under({**pod_env(), **injected}, config, monkeypatch)
    assert the("StatefulSet")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_kubernetes_and_compose_images_are_the_documented_ones() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    image = worker_container()["image"]
    repository, _, tag = image.rpartition(":")
    assert repository.endswith("/goflow-gpu") and tag == version, image
    built = re.search(r"docker build -f Dockerfile.cuda -t (\S+)", DOCKERFILE.read_text())
    assert built is not None
    assert compose_worker()["image"] == built.group(1)
    assert compose_worker()["build"]["dockerfile"] == DOCKERFILE.name
    assert (COMPOSE.parent / compose_worker()["build"]["context"]).resolve() == ROOT


async def _serve_and_probe(paths: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Each path's status from a real ops server before and after the worker is ready."""
    readiness = Readiness()
    server = await start_ops_server("127.0.0.1", 0, Metrics(), readiness)
    statuses: dict[str, list[int]] = {what: [] for what in paths}
    try:
        async with aiohttp.ClientSession() as http:
            for stage in ("starting", "ready"):
                if stage == "ready":
                    readiness.engine_loaded = readiness.state_open = True
                    readiness.backend_ok()
                for what, path in paths.items():
                    async with http.get(server.url + path) as answer:
                        statuses[what].append(answer.status)
                        if what == "scrape":
                            assert "# TYPE" in await answer.text()
    finally:
        await server.stop()
    return {what: (s[0], s[1]) for what, s in statuses.items()}


def test_probes_and_the_scrape_hit_what_the_worker_serves() -> None:
    container = worker_container()
    (port,) = container["ports"]
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == port["name"], probe
        paths[probe] = get["path"]
    paths["scrape"] = the("ServiceMonitor")["spec"]["endpoints"][0]["path"]
    paths["control"] = "/no-such-path"
    statuses = asyncio.run(asyncio.wait_for(_serve_and_probe(paths), 20))
    assert statuses == {
        "startupProbe": (200, 200),
        "livenessProbe": (200, 200),  # alive before the model is loaded: no restart loop
        "readinessProbe": (503, 200),  # ready only once the engine and backend are
        "scrape": (200, 200),
        "control": (404, 404),
    }


# -- Docker Compose -----------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    typo = tmp_path / "compose.yaml"
    typo.write_text(
        COMPOSE.read_text(encoding="utf-8").replace("stop_grace_period:", "stop_grace_periode:"),
        encoding="utf-8",
    )
    refused = check_compose(typo)
    assert refused.returncode == 1
    assert "stop_grace_periode" in refused.stdout


def test_compose_worker_gets_a_gpu_its_volumes_and_the_key_from_outside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = compose_worker()
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    config = config_arg(worker["command"])
    # The image holds the repository's configs/ at /app/configs (Dockerfile.cuda: COPY).
    assert config.startswith("/app/configs/")
    settings = settings_under(compose_env(), ROOT / "configs" / Path(config).name, monkeypatch)
    assert device["count"] == settings.tensor_parallel_size * settings.data_parallel_size
    volumes = dict(v.split(":")[:2] for v in worker["volumes"])  # volume name -> path
    assert Path(volumes["state"]) == settings.state_dir
    assert Path(compose_env()["HF_HOME"]) == Path(volumes["hf"])
    assert set(volumes) <= set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    (published,) = worker["ports"]
    host, _, container_port = published.split(":")
    assert host == "127.0.0.1"  # no authentication on /metrics
    assert int(container_port) == settings.metrics_port and settings.metrics_host == "0.0.0.0"
    # The key: from the caller's environment (or a git-ignored .env), refused when missing.
    assert worker["environment"]["GOFLOW_API_KEY"].startswith("${GOFLOW_API_KEY:?")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(COMPOSE.parent / ".env")], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "deploy/compose/.env must be git-ignored"
    assert worker["shm_size"]  # NCCL needs more than Docker's 64 MB


def test_compose_healthcheck_is_the_images_and_passes_against_a_live_worker() -> None:
    test = compose_worker()["healthcheck"]["test"]
    healthcheck = only(parse(DOCKERFILE.read_text(encoding="utf-8")), "HEALTHCHECK").args
    assert test[0] == "CMD"
    assert test[1:] == json.loads(healthcheck.partition("CMD ")[2])
    interpreter, flag, code = test[1:]
    assert (interpreter, flag) == ("python3", "-c")

    async def run_check(port: int) -> int:
        env = {**os.environ, **compose_env(), "GOFLOW_METRICS_PORT": str(port)}
        env.pop("GOFLOW_API_KEY")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        return await child.wait()

    async def main() -> tuple[int, int]:
        server = await start_ops_server("127.0.0.1", 0, Metrics(), Readiness())
        try:
            healthy = await run_check(server.port)
        finally:
            await server.stop()
        return healthy, await run_check(server.port)

    healthy, stopped = asyncio.run(asyncio.wait_for(main(), 60))
    assert healthy == 0  # /healthz answers even before the worker is ready
    assert stopped != 0


# -- no secret anywhere, and the docs point here ------------------------------------------------


def deploy_files() -> Iterator[Path]:
    for path in sorted((ROOT / "deploy").rglob("*")):
        if path.is_file() and path.name != ".env":  # an operator's own, git-ignored
            yield path


def key_like_strings(text: str) -> list[str]:
    """Long runs that mix lower case, upper case and digits, as generated keys and tokens do;
    the names, paths and placeholders of these files never do."""
    return [
        run
        for run in re.findall(r"[A-Za-z0-9_+/=-]{20,}", text)
        if all(re.search(kind, run) for kind in (r"[a-z]", r"[A-Z]", r"[0-9]"))
    ]


def test_no_secret_value_in_any_deploy_file() -> None:
    assert secret_example()["stringData"] == {"api-key": "REPLACE-WITH-THE-AGENT-API-KEY"}
    assert "data" not in secret_example()
    for path in deploy_files():
        text = path.read_text(encoding="utf-8")
        assert key_like_strings(text) == [], path.name
        # Wherever the key variable is given a value, it comes from the caller's environment
        # (or is the "..." of an example command).
        for value in re.findall(r"GOFLOW_API_KEY\s*[:=]\s*(\S+)", text):
            assert value == "..." or value.startswith(("${GOFLOW_API_KEY", '"$GOFLOW_API_KEY"')), (
                path.name,
                value,
            )
    # The check can fail: a key pasted into the example is found.
    assert key_like_strings("stringData:\n  api-key: gf_live_Zq8rT2wXk9LmP4vB7nC1") == [
        "gf_live_Zq8rT2wXk9LmP4vB7nC1"
    ]


def test_operations_md_points_at_deploy() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    assert "kubectl apply -k deploy/kubernetes" in text
    assert "docker compose -f deploy/compose/compose.yaml up" in text
    assert "kind: StatefulSet" not in text  # the manifest lives in deploy/, not inlined
    for name in kustomization()["resources"]:
        assert f"`{name}`" in text, name
