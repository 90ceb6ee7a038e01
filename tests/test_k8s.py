"""The Kubernetes manifests in launch/k8s/, checked offline: nothing here needs or contacts a cluster.

- every manifest validates against the Kubernetes schemas bundled with kubernetes-validate (strict: unknown
  fields are errors);
- the Job, the headless Service, the shared volume and the verify Job name each other consistently;
- the pods' torchrun command line is launch/multi_node.sh's: both run with a stand-in `torchrun` that prints its
  arguments, and must print the same ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "launch" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
MULTI_NODE = ROOT / "launch" / "multi_node.sh"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
ENTRY = ["-m", "disttrain", "train"]
POD_IP = "10.0.0.7"  # stands in for the downward API's status.podIP; never contacted


def _resources() -> dict[tuple[str, str], dict]:
    """(kind, name) -> resource, over every manifest."""
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _node_job() -> dict:
    jobs = [r for (kind, _), r in _resources().items()
            if kind == "Job" and r["spec"].get("completionMode") == "Indexed"]
    assert len(jobs) == 1, "launch/k8s/ must hold exactly one indexed Job (the nodes)"
    return jobs[0]


def _container(resource: dict) -> dict:
    (container,) = resource["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, var
            env[var["name"]] = POD_IP
    return env


def test_manifests_validate_against_kubernetes_schemas(tmp_path):
    assert {p.name for p in MANIFESTS} >= {"job.yaml", "pvc.yaml", "verify.yaml"}
    validate = [sys.executable, "-m", "kubernetes_validate", "--strict", "--no-warn"]
    result = subprocess.run([*validate, *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator really is strict: a misspelt field fails.
    broken = tmp_path / "job.yaml"
    broken.write_text((K8S / "job.yaml").read_text().replace("resources:", "resorces:", 1))
    result = subprocess.run([*validate, str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "resorces" in result.stdout + result.stderr


def test_job_service_volume_and_verify_agree():
    resources = _resources()
    job = _node_job()
    service = resources[("Service", job["spec"]["template"]["spec"]["subdomain"])]
    pod = job["spec"]["template"]
    container = _container(job)
    env = _env(container)

    # Headless Service over exactly these pods: pod i resolves as <job>-<i>.<service>.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}", "pod index 0 hosts the rendezvous"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert int(port) in [p["containerPort"] for p in container["ports"]]

    # One pod per node, all at once; NNODES ("N" or "MIN:MAX") never asks for more pods than the Job has.
    nnodes = env["NNODES"].split(":")
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(nnodes[-1])
    assert pod["spec"]["restartPolicy"] == "Never"
    assert int(env["MAX_RESTARTS"]) >= 1
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()

    # The project's CPU image (the compose cluster's), a config of the repository, the run on the shared volume.
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert container["image"] == compose["services"]["node"]["image"]
    assert (ROOT / env["CONFIG"]).is_file()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["runs"]["persistentVolumeClaim"]["claimName"]
    pvc = resources[("PersistentVolumeClaim", claim)]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "pods on several nodes mount the run directory"
    assert mounts["runs"] == "/workspace/runs" and env["OUT_DIR"].startswith("runs/")

    # verify.yaml checks that run: same config, --against the Job's out_dir, on the same volume.
    verify = resources[("Job", "disttrain-verify")]
    command = _container(verify)["command"]
    assert command[:3] == ["disttrain", "verify", env["CONFIG"]]
    assert command[command.index("--against") + 1] == env["OUT_DIR"]
    assert verify["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert _container(verify)["volumeMounts"][0]["mountPath"] == mounts["runs"]


def _torchrun_args(cmd: list[str], env: dict[str, str], cwd: Path, stubs: Path) -> list[str]:
    """The arguments ``cmd`` hands torchrun (a stand-in that prints them, one per line)."""
    full_env = {**os.environ, **env, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def stub_torchrun(tmp_path) -> Path:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "torchrun").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    (stubs / "torchrun").chmod(0o755)
    return stubs


@pytest.mark.parametrize("index, rdzv_conf", [(0, None), (1, None), (1, "last_call_timeout=3,close_timeout=5")])
def test_pod_command_is_multi_node_script_torchrun_line(index, rdzv_conf, stub_torchrun, tmp_path):
    container = _container(_node_job())
    env = _env(container)
    if rdzv_conf is not None:
        env["RDZV_CONF"] = rdzv_conf
    pod_env = {**env, "JOB_COMPLETION_INDEX": str(index)}
    pod_args = _torchrun_args(container["command"], pod_env, tmp_path, stub_torchrun)
    assert ENTRY in [pod_args[i:i + 3] for i in range(len(pod_args))], pod_args
    cut = next(i for i in range(len(pod_args)) if pod_args[i:i + 3] == ENTRY)
    train_args = pod_args[cut + 3:]
    assert train_args[0] == env["CONFIG"] and f"train.out_dir={env['OUT_DIR']}" in train_args
    assert "--resume" not in train_args, "a first start must not resume"

    # launch/multi_node.sh with the same knobs and the same arguments for `disttrain train`.
    script_env = {k: env[k] for k in ("NNODES", "NPROC_PER_NODE", "MAX_RESTARTS", "RDZV_ENDPOINT", "RDZV_ID",
                                      "LOCAL_ADDR")}
    # The node that owns RDZV_ENDPOINT says so; any other rendezvous settings follow.
    script_env["RDZV_CONF"] = ",".join(filter(None, [f"is_host={int(index == 0)}", env["RDZV_CONF"]]))
    script_args = _torchrun_args([str(MULTI_NODE), *train_args], script_env, tmp_path, stub_torchrun)
    assert pod_args == script_args

    # A pod that replaces a failed one finds the checkpoints on the shared volume and continues from them.
    checkpoints = tmp_path / env["OUT_DIR"] / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step_00000005.pt").touch()
    assert _torchrun_args(container["command"], pod_env, tmp_path, stub_torchrun) == [*pod_args, "--resume"]


def test_pod_command_passes_shellcheck(tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package: shellcheck)")
    command = _container(_node_job())["command"]
    assert command[:2] == ["bash", "-c"]
    script = tmp_path / "pod.sh"
    script.write_text("#!/usr/bin/env bash\n" + command[2])
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
