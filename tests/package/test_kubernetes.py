"""packaging/kubernetes/web.yaml against what it runs: the image (packaging/Dockerfile) and the
config it mounts. No cluster runs here, so these are the facts a cluster would trip over: the
manifest parses, its config passes `molt check`, the command is the image's own, the probes hit
the ports and path the config serves, and the grace period covers the preStop delay plus the
drain."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from molt_testlib import REPO, molt_bin

MANIFEST = REPO / "packaging" / "kubernetes" / "web.yaml"
DOCKERFILE = REPO / "packaging" / "Dockerfile"


@pytest.fixture(scope="module")
def docs():
    by_kind = {}
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"ConfigMap", "Deployment", "Service"}
    return by_kind


@pytest.fixture(scope="module")
def container(docs):
    (only,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


@pytest.fixture(scope="module")
def molt_config(docs):
    return yaml.safe_load(docs["ConfigMap"]["data"]["molt.yaml"])


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    value, unit = int(match.group(1)), match.group(2)
    return value / 1000 if unit == "ms" else value * (60 if unit == "m" else 1)


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def test_the_mounted_config_passes_molt_check(docs, tmp_path):
    config = tmp_path / "molt.yaml"
    config.write_text(docs["ConfigMap"]["data"]["molt.yaml"])
    done = subprocess.run([molt_bin(), "check", "--offline", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_the_command_is_the_images_cmd_and_reads_the_mounted_config(container, docs):
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M)
    assert cmd, "the Dockerfile has an exec-form CMD"
    assert container["command"] == json.loads(cmd.group(1))
    config_path = Path(container["command"][container["command"].index("-c") + 1])
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == str(config_path.parent)
    volume = docs["Deployment"]["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert config_path.name in docs["ConfigMap"]["data"]


def test_the_pod_runs_as_the_images_user():
    uid = re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text().replace("\\\n", " "))
    assert uid
    manifest = yaml.safe_load_all(MANIFEST.read_text())
    deployment = next(d for d in manifest if d["kind"] == "Deployment")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == int(uid.group(1))


def test_probes_hit_what_the_config_serves(container, molt_config):
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == molt_config["health"]["path"]
    assert ready["port"] == port_of(molt_config["listen"])
    live = container["livenessProbe"]["httpGet"]
    assert live["path"] == "/metrics"
    assert live["port"] == port_of(molt_config["metrics"]["listen"])
    declared = {p["containerPort"] for p in container["ports"]}
    assert {ready["port"], live["port"]} <= declared


def test_the_grace_period_covers_prestop_and_the_drain(docs, container, molt_config):
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = seconds(molt_config["timeouts"]["graceful"])
    assert grace >= int(sleep[1]) + drain + 5


def test_the_service_targets_the_app_port(docs, molt_config):
    (port,) = docs["Service"]["spec"]["ports"]
    assert port["targetPort"] == port_of(molt_config["listen"])
    assert docs["Service"]["spec"]["selector"] == \
        docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
