#!/usr/bin/env bash
# The test suite against the oldest versions setup.cfg allows: makes a venv (default
# .venv-minimums), writes a constraints file pinning every `name>=X` of install_requires and
# of the test and turbojpeg extras to `name==X`, installs the package with those extras under
# it, and runs pytest with the arguments given. A pin that cannot be installed here (no wheel
# for this Python, say) fails the install, and pip's log names it.
#
#   bash scripts/test-minimums.sh -x -q          # PYTHON=python3.11 VENV=/tmp/min to choose
#
# torch, torchvision and torchdata are pinned too: their oldest releases are CUDA wheels,
# about 3 GB with the nvidia-* ones (CPU only is fine: no GPU is used). SKIP="torch torchvision
# torchdata" leaves the named packages unpinned. pip's resolve takes minutes here: it walks
# boto3 back to the release s3fs's aiobotocore pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-minimums}
SKIP=${SKIP-}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$PYTHON" - "$VENV/minimums.txt" "$SKIP" <<'PY'
import configparser, re, sys

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].splitlines()
for extra in ("test", "turbojpeg"):
    lines += cfg["options.extras_require"][extra].splitlines()
skip = set(sys.argv[2].lower().split())
pins = {}
for line in lines:
    match = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*>=\s*([^,;\s]+)", line)
    if match and match[1].lower() not in skip:
        pins[match[1].lower()] = match[3]
with open(sys.argv[1], "w") as out:
    out.writelines(f"{name}=={version}\n" for name, version in sorted(pins.items()))
PY
echo "pinned (in $VENV/minimums.txt; left free: ${SKIP:-none}):"
cat "$VENV/minimums.txt"
if ! "$VENV/bin/pip" install --disable-pip-version-check -c "$VENV/minimums.txt" \
        -e '.[test,turbojpeg]' >"$VENV/pip-install.log" 2>&1; then
    tail -40 "$VENV/pip-install.log"
    exit 1
fi
"$VENV/bin/pip" list --disable-pip-version-check 2>/dev/null \
    | grep -i -E "^($(tr '\n' '|' <"$VENV/minimums.txt" | sed 's/==[^|]*//g')torch|torchvision|torchdata) "
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
