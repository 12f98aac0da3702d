#!/usr/bin/env bash
# The benchmark runs behind BENCHMARKS.md's tables: `bash scripts/bench-matrix.sh`.
# Three 10k runs without pauses (the memory baseline), the matrix (10k, 100k and 1M recipients;
# PostgreSQL and SQLite; in-process and RabbitMQ; the benchmark's five pause/resume cycles), then
# three 1M runs on PostgreSQL + RabbitMQ without pauses (the issue's end-to-end target).
# Needs PostgreSQL and RabbitMQ at their default local addresses; takes about 6 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin bench
run() {
    echo "=== $(date +%H:%M:%S) $*"
    "${CARGO_TARGET_DIR:-target}/release/bench" "$@"
}
for _ in 1 2 3; do
    run --recipients 10000 --store postgres --transport rabbitmq --pauses 0
done
for n in 10000 100000 1000000; do
    for store in postgres sqlite; do
        for transport in in_process rabbitmq; do
            run --recipients "$n" --store "$store" --transport "$transport"
        done
    done
done
for _ in 1 2 3; do
    run --recipients 1000000 --store postgres --transport rabbitmq --pauses 0
done
