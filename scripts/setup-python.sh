#!/usr/bin/env bash
# Creates the Python environment the OpenAI client check needs (scripts/openai-client-check.py,
# run by engine/tests/openai_client.rs): a virtual environment in .venv with a pinned version of
# the official `openai` package from PyPI. Idempotent: does nothing when .venv already has that
# version. Needs python3 with the venv module (Debian/Ubuntu: apt-get install python3-venv) and
# access to PyPI (or the index PIP_INDEX_URL names).
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned, so that the check is reproducible; openai 3.x needs Python 3.10 or newer, older
# Pythons get the last 1.x release (the same chat, completions and models API).
OPENAI_VERSION=3.57.0
OPENAI_VERSION_OLD_PYTHON=1.109.1
VENV=.venv

if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 is not installed" >&2
    exit 1
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    OPENAI_VERSION=$OPENAI_VERSION_OLD_PYTHON
fi

installed() {
    "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" \
        >/dev/null 2>&1
}

if [ -x "$VENV/bin/python" ] && installed; then
    echo "setup-python: $VENV has openai $OPENAI_VERSION"
    exit 0
fi

# A venv whose interpreter no longer runs (Python upgraded or removed) is rebuilt.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    if ! python3 -m venv "$VENV"; then
        rm -rf "$VENV"
        if python3 -m virtualenv --version >/dev/null 2>&1; then
            python3 -m virtualenv "$VENV"
        else
            echo "error: cannot create a virtual environment: install python3-venv" \
                "(apt-get install python3-venv) or virtualenv" >&2
            exit 1
        fi
    fi
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "openai==$OPENAI_VERSION"
installed
echo "setup-python: $VENV has openai $OPENAI_VERSION"
