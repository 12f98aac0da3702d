#!/usr/bin/env bash
# Slices of 64 per second that PostgreSQL sustains under the two claim models, four clients,
# 10 s each, alternated: `bash scripts/claim-model/run.sh [rounds]`. Uses a scratch database,
# dropped at the end. Needs psql and pgbench (PostgreSQL's client package).
set -euo pipefail
cd "$(dirname "$0")"
db=smsbatch_scratch_claims
pg=(-h 127.0.0.1 -U postgres)
export PGOPTIONS="-c client_min_messages=warning"
psql -q "${pg[@]}" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap 'psql -q "${pg[@]}" -c "DROP DATABASE IF EXISTS $db"' EXIT
for round in $(seq 1 "${1:-3}"); do
    for model in a b; do
        psql -q "${pg[@]}" -d "$db" -f setup.sql >/dev/null
        tps=$(pgbench "${pg[@]}" -n -c 4 -j 2 -T 10 -f "$model.sql" "$db" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        states=$(psql "${pg[@]}" -d "$db" -tAc "SELECT string_agg(status || ':' || n, ' ') FROM (SELECT status, count(*) n FROM messages GROUP BY 1 ORDER BY 1) s")
        echo "round $round model $model: $tps slices/s; messages by status $states"
    done
done
