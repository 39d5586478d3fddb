#!/usr/bin/env bash
# Run a GPU script longer than one device call (10 min) across consecutive calls on one
# warm machine: the script runs in its own process session, which outlives the call.
#   bash ci/gpu/bg.sh start ci/gpu/all.sh   # starts it, follows its console ~9.5 min
#   bash ci/gpu/bg.sh wait                  # next call (the machine must still be warm):
#                                           # follows it to the end or ~9.5 min, then packs
#                                           # its outputs into $OUT/bg.tgz
# The script writes under /tmp/bgout (its OUT); its console is /tmp/bgout/console.log.
set -u
BG=/tmp/bgout
follow() {  # print the console as it grows until the script is done or $1 seconds pass
  local until=$((SECONDS + $1))
  while [ ! -f $BG/done ] && [ $SECONDS -lt $until ]; do sleep 5; done
  cat $BG/console.log
  [ -f $BG/done ] && echo "== finished rc=$(cat $BG/done)" || echo "== still running"
}
case "${1:-}" in
  start)
    rm -rf $BG && mkdir -p $BG
    OUT=$BG setsid bash -c "bash $2 > $BG/console.log 2>&1; echo \$? > $BG/done" < /dev/null &
    follow "${3:-570}" ;;
  wait)
    [ -d $BG ] || { echo "no background run on this machine (a fresh one?)"; exit 1; }
    follow "${2:-540}"
    tar czf "$OUT/bg.tgz" -C $BG --exclude='*.trace.json.gz' . && ls -la "$OUT" ;;
  *) echo "usage: bg.sh start SCRIPT [SECONDS] | wait [SECONDS]"; exit 2 ;;
esac
