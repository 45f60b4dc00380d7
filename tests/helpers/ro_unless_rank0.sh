#!/bin/sh
# ro_unless_rank0.sh DIR CMD...: run CMD; on every rank but global rank 0, with DIR mounted read-only
# (in a private mount namespace), so that a write from another rank fails loudly.
dir=$1; shift
if [ "${RANK:-0}" != "0" ]; then
  mkdir -p "$dir"
  exec unshare -m sh -c 'mount --bind -o ro "$0" "$0" && exec "$@"' "$dir" "$@"
fi
exec "$@"
