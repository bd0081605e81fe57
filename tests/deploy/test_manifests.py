"""deploy/: schema validation of the compose file and the Kubernetes manifests, and the invariants between the files.

Schemas come from installed packages, never the network: kubernetes-validate ships the Kubernetes API's JSON
schemas per release (strict: an unknown or misspelt field fails), check-jsonschema vendors the Compose
Specification's schema. Envoy's config and the Dockerfile have no validator installable here; they get structural
checks. The servers' flags in every file are parsed by reaas-server's own argument parser, so a misspelt flag fails
here rather than in a crash-looping container. Nothing here runs Docker or a cluster (README, "Running at scale").
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_files import DEPLOY, ROOT, dockerfile_arg_defaults, dockerfile_instructions, dockerfile_stages

from reaas_server.cli import build_parser

K8S = DEPLOY / "k8s"
PROBE_PATH = "/opt/reaas/healthcheck.py"  # where the Dockerfile puts deploy/healthcheck.py
HEALTH_SERVICE = "reaas.v1.EncoderService"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # the oldest we claim, and the newest shipped
MARGIN_S = 5  # at least this much time between the server's promised exit and a SIGKILL


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> dict[str, dict]:
    """Every resource in deploy/k8s by "Kind/name" (the kustomization and the example Secrets included)."""
    documents = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[f"{document['kind']}/{document.get('metadata', {}).get('name', path.name)}"] = document
    return documents


def server_flags(args: list[str]) -> Namespace:
    """``args`` parsed by reaas-server's own parser. --checkpoint names a file inside the image, so only its
    existence check is left out."""
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "checkpoint":
            action.type = str
    return parser.parse_args(args)


def seconds(duration: str | int) -> float:
    """A Go / Envoy / Compose duration ("40s", "1m30s", "500ms") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def probe_args(command: list[str]) -> Namespace:
    """The healthcheck.py flags of a probe command (``python /opt/reaas/healthcheck.py ...``)."""
    assert command[:2] == ["python", PROBE_PATH], command
    options = {"address": "127.0.0.1:50051", "tls_ca": None, "tls_server_name": None, "service": HEALTH_SERVICE}
    words = iter(command[2:])
    for word in words:
        name, _, value = word.partition("=")
        options[name.removeprefix("--").replace("-", "_")] = value or next(words)
    return Namespace(**options)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# -- Dockerfile ---------------------------------------------------------------------------------------------------

def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec (JSON) form: {arguments}"
    return value


def test_dockerfile_is_multi_stage_on_python_slim():
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert len(froms) >= 2
    assert all(re.match(r"python:\$\{PYTHON_VERSION\}-slim AS \w+$", f) for f in froms), froms


def pip_installs() -> list[tuple[list[str], dict[str, str]]]:
    """Each `pip install` of a RUN: (requirements, options with their values)."""
    installs = []
    for op, args in dockerfile_instructions():
        for segment in args.split("&&") if op == "RUN" else ():
            words = shlex.split(segment)
            if len(words) < 2 or Path(words[0]).name not in ("pip", "pip3") or words[1] != "install":
                continue
            requirements, options, rest = [], {}, iter(words[2:])
            for word in rest:
                if word.startswith("-"):
                    name, _, value = word.partition("=")
                    options[name] = value or (next(rest) if name in ("--index-url", "--extra-index-url") else "")
                else:
                    requirements.append(word)
            installs.append((requirements, options))
    return installs


def test_dockerfile_installs_torch_only_pinned_and_from_the_pytorch_index():
    torch_installs = [(reqs, options) for reqs, options in pip_installs()
                      if any(re.match(r"torch($|[^\w-])", r) for r in reqs)]
    assert torch_installs, "no torch install found"
    for requirements, options in torch_installs:
        # a bare `torch` from PyPI is the multi-GB CUDA build; the pin and the index choose the build
        assert [r for r in requirements if r.startswith("torch")] == ["torch==2.13.0"], requirements
        assert options["--index-url"] == "${TORCH_INDEX}"
        assert "--extra-index-url" not in options  # PyPI's torch must not win over the index's
    assert dockerfile_arg_defaults()["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"  # CPU unless a build asks for CUDA
    assert (["/src[server]"], {}) in pip_installs()  # the project, its server extra finding torch installed


def test_dockerfile_generates_protobuf_code_at_build_time_and_never_copies_it():
    instructions = dockerfile_instructions()
    copies = [args for op, args in instructions if op == "COPY"]
    assert not any(re.match(r"(--\S+ )*reaas/", c) or c.startswith(". ") for c in copies), copies
    assert any(op == "RUN" and 'pip install "/src[server]"' in args for op, args in instructions)
    assert "protos/ protos/" in copies  # the wheel build's protoc input
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"reaas", ".venv", ".git"} <= set(ignored)


def test_dockerfile_copies_exist_in_the_context_and_are_not_ignored():
    ignored = {line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line and not line.startswith("#")}
    defaults = dockerfile_arg_defaults()
    for op, args in dockerfile_instructions():
        if op != "COPY" or args.startswith("--from"):
            continue
        for source in shlex.split(args)[:-1]:
            source = source.replace("${ENCODER}", defaults["ENCODER"])
            assert (ROOT / source).exists(), source
            assert source.split("/")[0].rstrip("/") not in ignored, f"{source} is in the .dockerignore"


def test_image_runs_as_a_numeric_non_root_user_with_reaas_server_as_entrypoint():
    stage = final_stage()
    ops = [op for op, _ in stage]
    user = next(args for op, args in stage if op == "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # runAsNonRoot can verify only a numeric USER
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    assert exec_form(next(args for op, args in stage if op == "ENTRYPOINT")) == ["reaas-server"]
    assert int(uid) == deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_image_healthcheck_probes_the_port_the_default_command_serves():
    stage = final_stage()
    cmd = server_flags(exec_form(next(args for op, args in stage if op == "CMD")))
    healthcheck = next(args for op, args in stage if op == "HEALTHCHECK")
    probe = probe_args(exec_form(healthcheck.split("CMD", 1)[1].strip()))
    assert port_of(probe.address) == cmd.port
    assert int(next(args for op, args in stage if op == "EXPOSE")) == cmd.port
    assert cmd.host == "0.0.0.0" and cmd.checkpoint == "/models/encoder"
    assert f"deploy/healthcheck.py {PROBE_PATH}" in [args for op, args in stage if op == "COPY"]


# -- compose + Envoy ----------------------------------------------------------------------------------------------

def compose_schema() -> dict:
    schema = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema.read_text())


def compose_errors(document: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_validates_against_the_compose_spec():
    assert compose_errors(load(DEPLOY / "compose.yaml")) == []


def test_compose_validator_rejects_a_misspelt_key():
    document = load(DEPLOY / "compose.yaml")
    document["services"]["reaas-server"]["stop_grace_periods"] = "40s"
    assert compose_errors(document)


def test_compose_runs_three_replicas_behind_envoy_on_a_healthy_postgres():
    services = load(DEPLOY / "compose.yaml")["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    server = services["reaas-server"]
    assert server["deploy"]["replicas"] == 3
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["envoy"]["depends_on"]["reaas-server"]["condition"] == "service_healthy"
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in services["envoy"]["volumes"]


def test_compose_ledger_dsn_comes_from_the_environment_not_the_command():
    server = load(DEPLOY / "compose.yaml")["services"]["reaas-server"]
    flags = server_flags(server["command"])
    assert not any(word.startswith("--ledger") for word in server["command"])
    assert server["environment"]["REAAS_LEDGER"].startswith("postgresql://reaas:${POSTGRES_PASSWORD")
    assert flags.host == "0.0.0.0"


def test_compose_drain_timing_fits_stop_grace_period_and_envoy_health_checks():
    server = load(DEPLOY / "compose.yaml")["services"]["reaas-server"]
    flags = server_flags(server["command"])
    assert flags.drain_delay < flags.grace  # the delay is counted within --grace; it must leave time for calls
    assert seconds(server["stop_grace_period"]) >= flags.grace + MARGIN_S
    check = envoy_cluster()["health_checks"][0]
    # Envoy must see NOT_SERVING before the port closes: worst case one interval per failure plus the last timeout
    noticed_within = seconds(check["interval"]) * check["unhealthy_threshold"] + seconds(check["timeout"])
    assert noticed_within <= flags.drain_delay


def test_compose_healthcheck_and_envoy_target_the_server_port_and_health_service():
    server = load(DEPLOY / "compose.yaml")["services"]["reaas-server"]
    flags = server_flags(server["command"])
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and port_of(probe_args(test[1:]).address) == flags.port
    cluster = envoy_cluster()
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("reaas-server", flags.port)
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == HEALTH_SERVICE


def envoy_config() -> dict:
    return load(DEPLOY / "envoy.yaml")


def envoy_cluster() -> dict:
    (cluster,) = envoy_config()["static_resources"]["clusters"]
    return cluster


def test_envoy_balances_calls_over_http2_and_retries_unavailable_elsewhere():
    cluster = envoy_cluster()
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert cluster["type"] == "STRICT_DNS"  # one host per replica the service name resolves to
    (listener,) = envoy_config()["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == cluster["name"]
    assert seconds(route["route"]["timeout"]) == 0  # no 15 s default cutting F2I calls; the gRPC deadline rules
    assert seconds(manager["stream_idle_timeout"]) >= 3600  # nor the 5 min idle default a long F2I call reaches
    retry = route["route"]["retry_policy"]
    assert "unavailable" in retry["retry_on"].split(",") and "reset" not in retry["retry_on"].split(",")
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


# -- Kubernetes ---------------------------------------------------------------------------------------------------
# The invariants hold for the manifests as written and for what `kubectl apply -k` sends of each variant: deploy/k8s
# (TLS, exec probes) and deploy/k8s-plaintext (its overlay: plaintext port, the kubelet's grpc probes).

KUBECTL = shutil.which("kubectl")
VARIANTS = [
    "files",
    pytest.param("k8s", marks=pytest.mark.skipif(KUBECTL is None, reason="kubectl (its kustomize) is not on PATH")),
    pytest.param("k8s-plaintext",
                 marks=pytest.mark.skipif(KUBECTL is None, reason="kubectl (its kustomize) is not on PATH")),
]


@functools.cache
def kustomized(variant: str) -> tuple[dict, ...]:
    """What `kubectl apply -k deploy/VARIANT` sends: kubectl's built-in kustomize, offline."""
    rendered = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / variant)], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    return tuple(yaml.safe_load_all(rendered))


def manifests(variant: str) -> dict[str, dict]:
    documents = k8s_documents().values() if variant == "files" else kustomized(variant)
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in documents if d["kind"] != "Kustomization"}


def deployment(variant: str = "files") -> dict:
    return manifests(variant)["Deployment/reaas-server"]


def container(variant: str = "files") -> dict:
    (only,) = deployment(variant)["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates_strictly(variant, version):
    documents = manifests(variant)
    assert documents
    for document in documents.values():
        kubernetes_validate.validate(document, version, strict=True)  # raises ValidationError naming the field


def test_kubernetes_validator_rejects_a_misspelt_field():
    document = copy.deepcopy(deployment())
    document["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secrets():
    kustomization = load(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == files  # applying placeholders would overwrite real Secrets


@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_kustomize_sends_the_four_resources_into_the_namespace(variant):
    documents = kustomized(variant)
    assert sorted(d["kind"] for d in documents) == ["Deployment", "Namespace", "PodDisruptionBudget", "Service"]
    assert all(d["kind"] == "Namespace" or d["metadata"]["namespace"] == "reaas" for d in documents)


def test_plaintext_overlay_changes_only_tls_and_the_probes():
    base = [a for a in container()["args"] if not a.startswith("--tls-")]
    patch = load(DEPLOY / "k8s-plaintext" / "native-grpc-probes.yaml")
    assert patch["spec"]["template"]["spec"]["containers"][0]["args"] == base


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_reach_the_server_port_over_tls_when_the_server_speaks_tls(variant):
    flags = server_flags(container(variant)["args"])
    ports = {p["name"]: p["containerPort"] for p in container(variant)["ports"]}
    assert ports["grpc"] == flags.port and ports["metrics"] == flags.metrics_port
    service = manifests(variant)["Service/reaas-grpc"]
    server_name = f"{service['metadata']['name']}.{load(K8S / 'kustomization.yaml')['namespace']}.svc.cluster.local"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container(variant)[kind]
        if "grpc" in probe:  # the kubelet's own client: plaintext only, so never for a TLS server
            assert flags.tls_cert is None, kind
            assert probe["grpc"] == {"port": flags.port, "service": HEALTH_SERVICE}, kind
            assert "exec" not in probe
            continue
        args = probe_args(probe["exec"]["command"])
        assert port_of(args.address) == flags.port, kind
        assert args.service == HEALTH_SERVICE
        assert (args.tls_ca is not None) == (flags.tls_cert is not None), kind
        assert args.tls_server_name == server_name, kind
        assert probe["timeoutSeconds"] >= 3  # a Python start plus one call on a busy node


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_prestop_and_the_servers_grace(variant):
    flags = server_flags(container(variant)["args"])
    pod = deployment(variant)["spec"]["template"]["spec"]
    pre_stop = container(variant)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert flags.drain_delay < flags.grace  # the drain delay is counted within --grace
    # terminationGracePeriodSeconds counts from the start of preStop; SIGKILL follows it
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + flags.grace + MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= flags.drain_delay + flags.grace + MARGIN_S


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_runs_as_non_root_without_privilege(variant):
    pod = deployment(variant)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = container(variant)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container(variant)["resources"]
    assert "memory" in resources["limits"] and "cpu" in resources["requests"]


def example_secrets() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())}


@pytest.mark.parametrize("variant", VARIANTS)
def test_dsn_and_tls_are_referenced_from_secrets_never_inlined(variant):
    server = container(variant)
    flags = server_flags(server["args"])
    assert not any(arg.startswith("--ledger") for arg in server["args"])
    (ledger,) = [e for e in server["env"] if e["name"] == "REAAS_LEDGER"]
    assert "value" not in ledger
    reference = ledger["valueFrom"]["secretKeyRef"]
    assert reference["key"] in example_secrets()[reference["name"]]["stringData"]
    assert not any("postgresql://" in env.get("value", "") for env in server["env"])
    secret_volumes = [v for v in deployment(variant)["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    if flags.tls_cert is None:
        assert secret_volumes == [] and flags.tls_key is None
        return
    (tls,) = secret_volumes
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    secret = example_secrets()[tls["secret"]["secretName"]]
    probe = probe_args(server["readinessProbe"]["exec"]["command"])
    for path in (flags.tls_cert, flags.tls_key, Path(probe.tls_ca)):
        assert path.parent == Path(mounts[tls["name"]]) and path.name in secret["stringData"], path


def test_example_secrets_hold_only_marked_placeholders():
    for document in example_secrets().values():
        assert document["kind"] == "Secret"
        assert all("REPLACE-ME" in value for value in document["stringData"].values())
    assert "EXAMPLE ONLY" in (K8S / "secret.example.yaml").read_text().splitlines()[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_headless_service_and_disruption_budget_select_the_pods(variant):
    documents = manifests(variant)
    labels = deployment(variant)["spec"]["template"]["metadata"]["labels"]
    service = documents["Service/reaas-grpc"]["spec"]
    assert service["clusterIP"] == "None"  # DNS answers every pod: the client's round_robin, no proxy
    assert service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["targetPort"] == "grpc" and port["port"] == server_flags(container(variant)["args"]).port
    budget = documents["PodDisruptionBudget/reaas-server"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] < deployment(variant)["spec"]["replicas"]
