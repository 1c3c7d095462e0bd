#!/usr/bin/env bash
# Prints the interpreter `make install` builds .venv/ with: $LONGHAUL_PYTHON when set;
# else CPython 3.12 where this machine has one that runs (the services' asyncio code
# costs markedly less CPU there than on 3.11: bench/README.md); else python3.11; else
# any python3 >= 3.11, the project's requires-python.
set -euo pipefail

supported() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

if [ -n "${LONGHAUL_PYTHON:-}" ]; then
  if supported "$LONGHAUL_PYTHON"; then echo "$LONGHAUL_PYTHON"; exit 0; fi
  echo "make install: LONGHAUL_PYTHON=$LONGHAUL_PYTHON is not a runnable Python >= 3.11" >&2
  exit 1
fi

candidates=(python3.12)
# pyenv's shim of a version not selected exists but refuses to run: look behind it.
for found in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
  [ -x "$found" ] && candidates+=("$found")
done
candidates+=(python3.11 python3)

for candidate in "${candidates[@]}"; do
  path=$(command -v "$candidate" 2>/dev/null) || continue
  if supported "$path"; then echo "$path"; exit 0; fi
done
echo "make install: needs python3.12 or python3.11 (or any python3 >= 3.11) on PATH" >&2
exit 1
