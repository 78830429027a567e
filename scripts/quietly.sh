#!/usr/bin/env bash
# Run one setup step with its output in a log, and say one line about it:
#
#   scripts/quietly.sh "what it does" LOG COMMAND [ARG...]
#
# A setup prints progress, not the screens of build-backend notices pip relays. What a
# user may have to act on is still shown: the log's tail when the step fails (with its
# exit status), and when it succeeds, pip's own warnings and errors (such as a
# dependency conflict it let through), each once.
set -uo pipefail
what=$1 log=$2
shift 2
mkdir -p "$(dirname "$log")"
echo "rayfarm setup: $what (log: $log)"
"$@" >"$log" 2>&1
status=$?
if [ "$status" -ne 0 ]; then
  echo "rayfarm setup: failed ($what), exit status $status; the end of $log:" >&2
  tail -n 40 "$log" >&2
  exit "$status"
fi
grep -E '^(WARNING|ERROR):' "$log" | awk '!seen[$0]++'
exit 0
