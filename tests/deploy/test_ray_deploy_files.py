"""Checks deploy/prometheus-ray.yml and deploy/kuberay-rayservice.yaml as far as this machine can.

`promtool check config` validates the Prometheus file. `kubectl apply --dry-run=client` cannot
check the KubeRay manifest here: even a client-side dry run asks an API server for the kinds
(and a RayService is a CRD). So the manifest is checked structurally: it parses, the Serve
application's import path and flags are the ones `loraserve serve-ray` accepts, every volume
mount names a declared volume, the store is ReadWriteMany and mounted where --data-dir points in
the replicas and in the ingress, and the Service reaches the ingress's port.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraserve.server.ray.main import build_parser, parse_configs

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RAYSERVICE = DEPLOY / "kuberay-rayservice.yaml"


def test_promtool_accepts_the_ray_scrape_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: install the Debian package 'prometheus' (.ci/run does)"
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus-ray.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DEPLOY / "prometheus-ray.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The replicas' own file_sd entries (server/ray/replica.py writes metrics-targets/*.json).
    assert jobs["loraserve"]["file_sd_configs"][0]["files"] == [
        "/var/lib/loraserve/metrics-targets/*.json"
    ]


def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def pod_specs(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def mount_path(container: dict[str, Any], volume: str) -> str:
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)


def test_rayservice_application_is_what_serve_ray_deploys() -> None:
    docs = documents()
    service = docs["RayService/loraserve"]
    assert service["apiVersion"] == "ray.io/v1"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["proxy_location"] == "Disabled"  # the loraserve ingress is the door
    (app,) = serve_config["applications"]
    assert app["name"] == "loraserve"  # launch.APP_NAME, which --attach looks up
    module, _, function = app["import_path"].partition(":")
    assert module == "loraserve.server.ray.launch" and function == "build_app"
    config, cluster = parse_configs(app["args"]["flags"])
    assert cluster.replicas == 2 and cluster.replica_gpus == 1
    gpu_workers = sum(
        group["replicas"]
        for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
        if c["resources"]["limits"].get("nvidia.com/gpu") == "1"
    )
    assert gpu_workers >= cluster.replicas
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"

    # Every replica's node mounts the shared store where --data-dir says, and the tenants file.
    for spec in pod_specs(service)[1:]:
        (worker,) = spec["containers"]
        assert mount_path(worker, "store") == str(config.data_dir)
        assert str(config.tenants_file).startswith(mount_path(worker, "tenants"))
        assert str(config.model_path).startswith(mount_path(worker, "models"))


def test_store_volume_is_shared_and_every_mount_is_declared() -> None:
    docs = documents()
    claim = docs["PersistentVolumeClaim/loraserve-store"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {name.split("/")[1] for name in docs if name.startswith("PersistentVolumeClaim/")}
    for spec in pod_specs(docs["RayService/loraserve"]):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "loraserve-store"
        for container in spec["containers"]:
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, (container["name"], mount["name"])


def test_ingress_container_runs_serve_ray_attached_and_the_service_reaches_it() -> None:
    docs = documents()
    head = pod_specs(docs["RayService/loraserve"])[0]
    ingress = next(c for c in head["containers"] if c["name"] == "loraserve-ingress")
    assert ingress["command"][:2] == ["loraserve", "serve-ray"]
    args = build_parser().parse_args(ingress["command"][2:])
    config, cluster = parse_configs(ingress["command"][2:])
    assert cluster.attach and cluster.address == "auto" and args.host == "0.0.0.0"
    assert config.tenants_file is not None  # required to bind beyond loopback
    assert mount_path(ingress, "store") == str(config.data_dir)
    # A driver on the head node: it needs the head's Ray session directory.
    ray_head = next(c for c in head["containers"] if c["name"] == "ray-head")
    assert mount_path(ingress, "ray-tmp") == mount_path(ray_head, "ray-tmp") == "/tmp/ray"
    (port,) = ingress["ports"]
    assert port["containerPort"] == config.port and ingress["readinessProbe"]["grpc"] == {
        "port": config.port
    }
    svc = docs["Service/loraserve-grpc"]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    assert svc["spec"]["selector"]["ray.io/node-type"] == "head"


def test_build_app_turns_the_flags_into_a_serve_application(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is the optional extra loraserve[ray]")
    from ray.serve import Application

    from loraserve.server.ray.launch import build_app

    # A RayService names its checkpoint (the manifest mounts one); nothing is loaded here.
    app = build_app({"flags": ["--replicas", "3", "--device", "cpu", "--model", str(tmp_path)]})
    assert isinstance(app, Application)
