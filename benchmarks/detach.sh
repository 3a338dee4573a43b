#!/usr/bin/env bash
# Device-call helper: `detach.sh start RESULTS CMD...` runs CMD in its own session (it outlives this
# call while the machine stays warm), its output in RESULTS/session.log and its exit status, once it
# ends, in RESULTS/exit_status; `detach.sh wait RESULTS SECONDS` waits for that up to SECONDS, then packs
# RESULTS into $OUT (one tarball, plus the log as text) whether or not CMD finished.
set -uo pipefail
mode=$1 results=$2; shift 2
mkdir -p "$results"
case $mode in
  start)
    rm -f "$results/exit_status"
    setsid nohup bash -c '"${@:2}" >"$1/session.log" 2>&1; echo $? >"$1/exit_status"' _ "$results" "$@" \
      </dev/null >/dev/null 2>&1 & ;;
  wait)
    deadline=$((SECONDS + $1))
    until [ -f "$results/exit_status" ] || ((SECONDS >= deadline)); do sleep 5; done
    tar czf "$OUT/results.tgz" -C "$results" . && cp "$results/session.log" "$OUT/session.log"
    grep -E "^===|^== |^\[[0-9]+/[0-9]+\]|result:|error" "$results/session.log" | tail -60
    echo "exit status: $(cat "$results/exit_status" 2>/dev/null || echo "still running")" ;;
  *) echo "usage: detach.sh start|wait RESULTS ..." >&2; exit 2 ;;
esac
