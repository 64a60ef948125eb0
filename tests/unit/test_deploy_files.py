"""The deployment files are checked against what they deploy: Kubernetes schemas, the real CLI parser.

Nothing here can be applied or built on this machine (no cluster, no Docker), so each file is held
to what can be checked offline: manifests against the Kubernetes OpenAPI schemas
(`kubernetes-validate`, strict: unknown fields fail), every command line in a manifest, image or unit
through edgecut's own argument parser and config validation, and the images' base, user and health
check.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import pytest

from edgecut.cli import build_parser
from edgecut.cloud.config import ServeConfig

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (edgecut[dev])")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"  # oldest release we claim; native gRPC probes are GA since 1.27


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """The real `edgecut` parser; argparse exits on an unknown flag, which fails the test."""
    return build_parser(argv).parse_args(argv)


def serve_config(argv: list[str]) -> ServeConfig:
    from edgecut.cloud.cli import config_from_args

    return config_from_args(parse_cli(argv))


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in load(path):
        if doc["kind"] == "RayService":  # a KubeRay CRD: its pod templates are checked below
            continue
        kv.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_deployment() -> None:
    (doc,) = load(K8S / "deployment.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)
    (doc,) = load(K8S / "deployment.yaml")
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo strict mode catches
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_applies_every_top_level_manifest() -> None:
    (kust,) = load(K8S / "kustomization.yaml")
    assert sorted(kust["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    (secret,) = kust["secretGenerator"]
    assert secret["name"] == "edgecut-service-key"


def test_deployment_runs_a_valid_server_with_grpc_probes_gpu_and_the_key_from_a_secret() -> None:
    (dep,) = load(K8S / "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (tail,) = pod["containers"]
    config = serve_config(tail["args"])
    assert config.host == "0.0.0.0" and config.device == "cuda" and config.tokens is not None
    grpc_port = next(p["containerPort"] for p in tail["ports"] if p["name"] == "grpc")
    assert grpc_port == config.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tail[probe]["grpc"]["port"] == config.port
    assert tail["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] > config.grace_s
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in tail["volumeMounts"]}
    key_volume = volumes[mounts[str(config.key.parent)]]
    assert key_volume["emptyDir"]["medium"] == "Memory"
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["install", "-m", "0400"]  # the service refuses group-readable keys
    assert volumes["secret"]["secret"]["secretName"] == "edgecut-service-key"
    assert volumes[mounts[str(config.bundles)]]["persistentVolumeClaim"]["readOnly"]


def test_service_is_headless_and_selects_the_pods_and_the_hpa_scales_them() -> None:
    (dep,) = load(K8S / "deployment.yaml")
    (svc,) = load(K8S / "service.yaml")
    (hpa,) = load(K8S / "hpa.yaml")
    assert svc["spec"]["clusterIP"] == "None"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]


def ray_app_args(serve_config_yaml: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve_config_yaml["applications"]
    assert app["import_path"] == "edgecut.cloud.ray_serve:build_app"
    assert serve_config_yaml["grpc_options"]["grpc_servicer_functions"] == [
        "edgecut.v1.edgecut_pb2_grpc.add_TailServiceServicer_to_server"
    ]
    return dict(app["args"])


@pytest.mark.parametrize("source", ["deploy/ray/serve.yaml", "deploy/k8s/ray/rayservice.yaml"])
def test_ray_serve_configs_hold_valid_app_arguments(source: str) -> None:
    from edgecut.cloud.ray_serve import RayScaling, _split

    (doc,) = load(DEPLOY.parent / source)
    config = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc
    serve_args, scaling_args = _split(ray_app_args(config))
    ServeConfig.from_mapping(serve_args)
    RayScaling(**scaling_args)
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return
    ServeDeploySchema.model_validate(config)


def test_rayservice_pod_templates_are_valid_pods() -> None:
    (doc,) = load(K8S / "ray" / "rayservice.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        kv.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
            K8S_VERSION,
            strict=True,
        )
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "docker" / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_tail_image_is_cuda_non_root_with_a_working_health_check() -> None:
    steps = dockerfile("Dockerfile.tail")
    base = next(arg for op, arg in steps if op == "FROM")
    assert base.startswith("nvidia/cuda:") and "cudnn" in base and "runtime" in base
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "onnxruntime-gpu" in run and "torch" not in run
    user = [arg for op, arg in steps if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert [op for op, _ in steps].index("USER") > max(i for i, (op, _) in enumerate(steps) if op == "RUN")
    (check,) = [arg for op, arg in steps if op == "HEALTHCHECK"]
    exec_form = yaml.safe_load(check.split("CMD", 1)[1])  # a JSON array
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "HEALTHCHECK", "exec")
    assert "127.0.0.1:50051" in exec_form[2]
    entry = yaml.safe_load(next(arg for op, arg in steps if op == "ENTRYPOINT"))
    cmd = yaml.safe_load(next(arg for op, arg in steps if op == "CMD"))
    assert entry == ["edgecut"] and serve_config(cmd).port == 50051


def test_edge_image_is_slim_python_without_torch() -> None:
    steps = dockerfile("Dockerfile.edge")
    base = next(arg for op, arg in steps if op == "FROM")
    assert base.startswith("python:") and "slim" in base
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert '"/src[edge]"' in run and "torch" not in run
    user = [arg for op, arg in steps if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")


def unit(name: str) -> dict[str, list[str]]:
    """systemd unit keys (several values per key kept), continuation lines joined."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_cloud_unit_runs_a_valid_tls_server_as_an_unprivileged_user() -> None:
    u = unit("edgecut-cloud.service")
    (exec_start,) = u["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/edgecut")
    config = serve_config(argv[1:])
    assert config.tls_cert is not None and config.tokens is not None
    assert u["User"] == ["edgecut"] and u["KillSignal"] == ["SIGTERM"]
    assert float(u["TimeoutStopSec"][0]) > config.grace_s
    assert u["NoNewPrivileges"] == ["yes"]


def test_edge_unit_still_parses() -> None:
    (exec_start,) = unit("edgecut-edge.service")["ExecStart"]
    args = parse_cli(shlex.split(exec_start)[1:])
    assert args.server and args.server_key
