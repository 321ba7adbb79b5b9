# Sourced by .ci/run: the Docker engine for the container tests (tests/test_containers.py).
ci_cache="${UPGRADER_CI_CACHE:-/var/cache/upgrader-ci}"
started_engine=""

start_engine() {
  if docker info >/dev/null 2>&1; then return; fi
  if ! command -v dockerd >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "no Docker engine could be started (dockerd missing or not root): the container tests will skip" >&2
    return
  fi
  dockerd >"${TMPDIR:-/tmp}/upgrader-ci-dockerd.log" 2>&1 &
  started_engine=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  echo "dockerd did not answer within 60 s; the container tests will skip:" >&2
  tail -n 20 "${TMPDIR:-/tmp}/upgrader-ci-dockerd.log" >&2
}

stop_engine() {
  if docker info >/dev/null 2>&1; then
    # The images (upgrader:cpu, upgrader:cuda, the S3 server) stay for the next run; what rebuilds left
    # untagged goes, and the build cache is held to what one build of both images needs.
    docker image prune -f >/dev/null || true
    docker builder prune -f --keep-storage 14GB >/dev/null || true
  fi
  if [ -n "$started_engine" ]; then
    kill "$started_engine" 2>/dev/null || true
    wait "$started_engine" 2>/dev/null || true
  fi
}

prepare_offline_builds() {
  docker info >/dev/null 2>&1 || return 0
  export UPGRADER_BASE_IMAGE=upgrader-base:bookworm UPGRADER_PIP_SOURCE=wheelhouse
  # A wheelhouse build never reads the torch index: both images install the wheelhouse's torch set. One value
  # for both makes upgrader:cuda a cache hit of upgrader:cpu rather than a second 6 GB image and build cache.
  export UPGRADER_TORCH_INDEX_URL_CPU=wheelhouse UPGRADER_TORCH_INDEX_URL_CUDA=wheelhouse
  df -h "$(docker info --format '{{.DockerRootDir}}')" "${TMPDIR:-/tmp}" >&2 || true
  if ! docker image inspect "$UPGRADER_BASE_IMAGE" >/dev/null 2>&1; then
    docker/make-base-image.sh "$UPGRADER_BASE_IMAGE"
  fi
  export UPGRADER_PROXY_IMAGE=upgrader-proxy:bookworm  # the nginx in front of the service, from Debian's package
  if ! docker image inspect "$UPGRADER_PROXY_IMAGE" >/dev/null 2>&1; then
    docker/make-proxy-image.sh "$UPGRADER_PROXY_IMAGE"
  fi
  mkdir -p "$ci_cache/wheelhouse"
  WHEELHOUSE="$ci_cache/wheelhouse" docker/make-wheelhouse.sh
  cp -al "$ci_cache/wheelhouse/." docker/wheelhouse/ 2>/dev/null || cp -a "$ci_cache/wheelhouse/." docker/wheelhouse/
}
