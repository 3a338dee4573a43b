#!/usr/bin/env bash
# Device-call helper: `detach.sh start RESULTS CMD...` runs CMD in its own session (it outlives this
# call while the machine stays warm); `detach.sh wait RESULTS SECONDS` waits for it up to SECONDS, then
# packs RESULTS into $OUT (one tarball, plus the log as text) whether or not it finished.
set -uo pipefail
mode=$1 results=$2; shift 2
mkdir -p "$results"
case $mode in
  start) setsid nohup "$@" >"$results/session.log" 2>&1 </dev/null & ;;
  wait)
    deadline=$((SECONDS + $1))
    until grep -q "=== .* done" "$results/session.log" 2>/dev/null || ((SECONDS >= deadline)); do sleep 5; done
    tar czf "$OUT/results.tgz" -C "$results" . && cp "$results/session.log" "$OUT/session.log"
    grep -E "^===|^== |^\[[0-9]+/[0-9]+\]|result:|error" "$results/session.log" | tail -60 ;;
  *) echo "usage: detach.sh start|wait RESULTS ..." >&2; exit 2 ;;
esac
