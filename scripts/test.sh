#!/usr/bin/env bash
# The test suite, on a fresh machine: makes .venv, installs the package with its test extra,
# tries to provide libturbojpeg for the optional PyTurboJPEG backend and jpegtran for the
# fixtures, runs mypy on the typed modules (setup.cfg's [mypy] files; an error fails the run),
# then pytest with the arguments given (`-m "not slow"`: the quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
# Optional system libraries: libturbojpeg0 for the PyTurboJPEG backend, libjpeg62-turbo-dev to
# build the region decoder. Without them the tests check the clear "missing" paths instead.
# Needed: jpegtran (libjpeg-turbo-progs) makes the arithmetic-coded JPEGs the tests use.
if ! ldconfig -p 2>/dev/null | grep -q libturbojpeg.so || [ ! -f /usr/include/jpeglib.h ] \
        || ! command -v jpegtran >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq libturbojpeg0 libjpeg62-turbo-dev \
            libjpeg-turbo-progs) >/dev/null 2>&1 \
            || echo "note: could not install libturbojpeg0/libjpeg62-turbo-dev/libjpeg-turbo-progs"
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/pip install --disable-pip-version-check -e '.[test,turbojpeg]' \
        >.venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log
    exit 1
fi
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
