#!/usr/bin/env bash
# One detached device session for issues 20 and 21: the parts given as SCRIPT:PART (benchmarks/SCRIPT.sh OUT
# PART; a quoted "SCRIPT:ARG ARG..." passes several arguments), in order; without any, the first 2026-12-06
# session's: the host's attention rate, Llama-2-70B and OPT-66B int4 (streamed with GPU KV and our host KV cache,
# DeepSpeed's settings), the OPT-30B KV paths (GPU cache, copied up, attended on the host), then the planner's
# residency and BLOOM's reference. Each part writes under OUT as it ends, so a session cut short keeps every
# finished part. Run from a copy outside the checkout (a later call replaces the checkout):
#   rm -rf /tmp/q && cp -r . /tmp/q && cd /tmp/q && bash benchmarks/detach.sh start /tmp/res bash benchmarks/on_device.sh bash benchmarks/int4_kv_session.sh /tmp/res/out [SCRIPT:PART ...]
#   bash benchmarks/detach.sh wait /tmp/res 560   # in each later call, until it prints an exit status
set -uo pipefail
OUT=${1:?usage: int4_kv_session.sh OUT [SCRIPT:PART ...]}
shift
cd "$(dirname "$0")/.."
parts=("$@")
((${#parts[@]})) || parts=(kv_attention:probe int4_175b_class:llama int4_175b_class:opt66b kv_attention:opt30b
                          int4_175b_class:resident int4_175b_class:bloom_rest)
for part in "${parts[@]}"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086  # a part's words after the first are that script's own arguments
  bash "benchmarks/${part%%:*}.sh" "$OUT" ${part#*:}
done
echo "=== done $(date -u +%H:%M:%S)"
