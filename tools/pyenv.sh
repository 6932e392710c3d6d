#!/usr/bin/env bash
# Creates (once, and again when tests/clients/requirements.txt changes) the
# Python venv the real-client tests use, and prints its interpreter's path.
# Needs python3 with venv (Debian: python3-venv) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/pyenv
req=tests/clients/requirements.txt
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/requirements.txt"; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
  cp "$req" "$venv/requirements.txt"
fi
echo "$PWD/$venv/bin/python"
