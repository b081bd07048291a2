#!/usr/bin/env bash
# The core test suite (numpy only: no torch, Keras or MPI installed) on every Python that
# pyproject.toml declares, each in its own venv with `pip install -e '.[test,tls]'`. Tests that
# need an extra skip themselves (pytest.importorskip).
# The venvs live in $FEDBERRY_VENV_DIR (default ~/.cache/fedberry: CI starts from a clean clone,
# and building four venvs costs about a minute each), as venv-py3.X; pip runs again when
# pyproject.toml or the checkout changes. FEDBERRY_VENV_DIR=. keeps them in the checkout
# (.venv-py3.X, gitignored). The tests import this checkout's src/ whatever is installed
# (tests/conftest.py), so venvs shared between checkouts test the right code.
#   bash scripts/test-pythons.sh              # 3.10 3.11 3.12 3.13
#   bash scripts/test-pythons.sh 3.10 3.13    # some of them
# Interpreters come from pyenv ($(pyenv root)/versions/3.X.*) or else from PATH (python3.X); a
# version found in neither is skipped with a line saying so, so that this runs anywhere.
# Budget: the whole CI (scripts/test.sh) must stay under ~20 min on 2 cores. Measured on the
# 2-core CI machine shared with other jobs: the core suite took 125-147 s per Python, 45 s of it
# tests/test_fuzz_chief.py's 10k bad frames at a live chief, 18 s the kernel-shaping slow-link
# tests and 45 s tests/test_connection_bounds.py's timers and descriptor floods; those are marked `heavy` and left out here (the main run has them: they exercise
# processes and the kernel, not what differs between Pythons), which brings a version to
# 50-70 s (all four: under 5 min). Building a venv costs about a minute the first time.
# FEDBERRY_PYTHONS_ALL=1 runs everything on every version. FEDBERRY_PYTHONS_JOBS: how many
# versions run at once (default 2).
# FEDBERRY_PYTHONS_PYTEST_ARGS: extra pytest arguments (e.g. a -k filter) for every version.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSIONS=("$@")
if [ ${#VERSIONS[@]} -eq 0 ]; then VERSIONS=(3.10 3.11 3.12 3.13); fi

find_python() {  # the newest pyenv build of version $1, else python$1 on PATH, else nothing
  local v="$1" root found=""
  if command -v pyenv >/dev/null 2>&1; then
    root="$(pyenv root)"
  else
    root="${PYENV_ROOT:-$HOME/.pyenv}"
  fi
  if [ -d "$root/versions" ]; then
    found="$(ls -d "$root/versions/$v".* 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$found" ] && [ -x "$found/bin/python$v" ]; then
      echo "$found/bin/python$v"
      return
    fi
  fi
  command -v "python$v" 2>/dev/null || true
}

VENV_DIR="${FEDBERRY_VENV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fedberry}"
STAMP="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
failed=()
ready=()
for v in "${VERSIONS[@]}"; do
  py="$(find_python "$v")"
  if [ -z "$py" ]; then
    echo "== Python $v: not found (neither pyenv nor python$v on PATH): skipped"
    continue
  fi
  if [ "$VENV_DIR" = . ]; then venv=".venv-py$v"; else venv="$VENV_DIR/venv-py$v"; fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "== Python $v: making $venv from $py"
    mkdir -p "$(dirname "$venv")"
    "$py" -m venv "$venv"
  fi
  if [ "$(cat "$venv/.fedberry-stamp" 2>/dev/null)" != "$STAMP" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,tls]"
    echo "$STAMP" > "$venv/.fedberry-stamp"
  fi
  ready+=("$v:$venv")
done

# The versions' runs go JOBS at a time (FEDBERRY_PYTHONS_JOBS, default 2): these tests mostly
# wait on sockets, timers and processes (about a third of their wall time is CPU), so two runs
# on 2 cores take little longer than one. Each run's output is shown whole when it ends.
JOBS="${FEDBERRY_PYTHONS_JOBS:-2}"
logs="$(mktemp -d "${TMPDIR:-/tmp}/fedberry-pythons.XXXXXX")"
trap 'rm -rf "$logs"' EXIT
select=(-m "not heavy")
if [ "${FEDBERRY_PYTHONS_ALL:-0}" = 1 ]; then select=(); fi

run_one() {  # version venv: the core tests on it, "passed"/"FAILED" in $logs/$1.status
  local v="$1" venv="$2" start=$SECONDS
  echo "== Python $v: $("$venv/bin/python" --version), core tests (numpy only)"
  # shellcheck disable=SC2086  # the extra arguments are meant to split
  if env -u KERAS_BACKEND "$venv/bin/python" -m pytest -q -p no:cacheprovider "${select[@]}" \
      ${FEDBERRY_PYTHONS_PYTEST_ARGS:-}; then
    echo "== Python $v: passed in $((SECONDS - start)) s"
    echo passed > "$logs/$v.status"
  else
    echo "== Python $v: FAILED after $((SECONDS - start)) s"
    echo FAILED > "$logs/$v.status"
  fi
}

running=()
show_finished() {  # print the logs of the runs that have ended, in the order they started
  local still=() v
  for v in "${running[@]}"; do
    if [ -f "$logs/$v.status" ]; then cat "$logs/$v.log"; else still+=("$v"); fi
  done
  running=("${still[@]+"${still[@]}"}")
}
for item in "${ready[@]+"${ready[@]}"}"; do
  v="${item%%:*}"
  venv="${item#*:}"
  while [ ${#running[@]} -ge "$JOBS" ]; do
    wait -n || true
    show_finished
  done
  run_one "$v" "$venv" > "$logs/$v.log" 2>&1 &
  running+=("$v")
done
wait || true
show_finished
for item in "${ready[@]+"${ready[@]}"}"; do
  v="${item%%:*}"
  if [ "$(cat "$logs/$v.status" 2>/dev/null)" != passed ]; then failed+=("$v"); fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "core tests failed on Python ${failed[*]}"
  exit 1
fi
