#!/usr/bin/env bash
# The test suite, on a fresh machine: makes .venv, installs the package with its test extra,
# tries to provide libturbojpeg for the optional PyTurboJPEG backend, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libturbojpeg.so; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq libturbojpeg0) >/dev/null 2>&1 \
            || echo "note: libturbojpeg0 not installed; the turbojpeg backend is tested as missing"
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/pip install --disable-pip-version-check -e '.[test,turbojpeg]' \
        >.venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log
    exit 1
fi
exec .venv/bin/python -m pytest "$@"
