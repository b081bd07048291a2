#!/usr/bin/env bash
# The front door as a new user meets it: README's demo command, `bash scripts/demo.sh` (which
# runs scripts/setup.sh), in a fresh clone of this checkout's HEAD, with nothing but Debian's
# own /usr/bin/python3 on PATH. That Python is externally managed (PEP 668), so setup.sh must
# make the clone's .venv and install there; the demo then runs one short round.
# pip's cache (~/.cache/pip) is reused, so a second run downloads nothing.
# Usage: bash scripts/check-fresh-setup.sh      (root or sudo; Debian, Ubuntu, Raspberry Pi OS)
# .ci/run runs it when FEDBERRY_FRESH_SETUP=1 (it takes minutes: the whole install into a venv).
set -euo pipefail
cd "$(dirname "$0")/.."

SYS_PY=/usr/bin/python3
if [ ! -x "$SYS_PY" ]; then
  echo "check-fresh-setup: no $SYS_PY on this machine: nothing to check" >&2
  exit 1
fi
if ! "$SYS_PY" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  echo "check-fresh-setup: $SYS_PY is not externally managed: this checks a Python that is" >&2
  exit 1
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fedberry-fresh.XXXXXX")"
trap 'rm -rf "$work"' EXIT
git clone -q --no-hardlinks . "$work/fedberry"
cd "$work/fedberry"
# A fresh machine's environment: the system's directories only (python3 is Debian's), no venv,
# no PYTHONPATH. pip's own settings (its cache, a mirror) are kept.
clean=(env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME -u PYTHON
       PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$HOME")
start=$SECONDS
"${clean[@]}" bash scripts/demo.sh --workers 2 --rounds 1 --out "$work/demo"
test -x .venv/bin/python || { echo "check-fresh-setup: setup.sh made no .venv" >&2; exit 1; }
test -s "$work/demo/metrics.jsonl" || { echo "check-fresh-setup: the demo wrote no metrics" >&2; exit 1; }
echo "check-fresh-setup: README's setup and demo ran with $SYS_PY (externally managed) in a" \
     "fresh clone, into its .venv, in $((SECONDS - start)) s"
