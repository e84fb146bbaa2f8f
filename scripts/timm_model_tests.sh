#!/usr/bin/env bash
# Run timm's own model test suite (tests/test_models.py of the installed timm release) against
# the refiner_vit_* presets, with Refiner-ViT classed like timm's ViTs: 'refiner_vit' joins the
# forward_intermediates module list and 'refiner_vit*' the non-standard (token-output) list.
#
#   scripts/timm_model_tests.sh                        # all refiner tests of timm's suite
#   scripts/timm_model_tests.sh -q -k refiner_vit_tiny  # extra arguments go to pytest
#
# timm's sdist is fetched once with pip and kept under $REFINER_TIMM_SDIST_DIR (default
# ~/.cache/refiner_pl): pip revalidates index pages on every call, so later runs use the kept
# copy and need no network. Nothing is installed; the installed timm is the one under test.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
VERSION=$("$PYTHON" -c 'import timm; print(timm.__version__)')
SDIST_DIR=${REFINER_TIMM_SDIST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/refiner_pl}
SDIST=$SDIST_DIR/timm-$VERSION.tar.gz

if [[ ! -f $SDIST ]]; then
    mkdir -p "$SDIST_DIR"
    "$PYTHON" -m pip download "timm==$VERSION" --no-deps --no-binary :all: -d "$SDIST_DIR" -q \
        || { echo "error: cannot fetch timm $VERSION's sdist: run once with the package registry reachable" >&2; exit 2; }
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/timm_model_tests.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SDIST" -C "$WORK" "timm-$VERSION/tests/test_models.py" "timm-$VERSION/tests/conftest.py"
# The tests alone, outside the sdist's tree, so that `import timm` is the installed package.
mkdir "$WORK/tests"
mv "$WORK/timm-$VERSION/tests/test_models.py" "$WORK/timm-$VERSION/tests/conftest.py" "$WORK/tests/"

"$PYTHON" - "$WORK/tests/test_models.py" <<'PY'
import sys
from pathlib import Path

path = Path(sys.argv[1])
source = path.read_text()
for anchor, entry in (
    ("FEAT_INTER_FILTERS = [\n", "    'refiner_vit',\n"),
    ("NON_STD_FILTERS = [\n", "    'refiner_vit*',\n"),
):
    if source.count(anchor) != 1:
        sys.exit(f"error: timm's test_models.py has no single {anchor.strip()!r} list to extend")
    source = source.replace(anchor, anchor + entry)
path.write_text(source)
PY

cat >> "$WORK/tests/conftest.py" <<'PY'

import refiner_pl  # noqa: E402,F401  (registers the refiner_vit_* presets in timm)
PY
cat > "$WORK/tests/pytest.ini" <<'INI'
[pytest]
markers =
    base: basic model tests
    forward: per-model forward tests
    backward: per-model backward tests
    cfg: config tests
    cfg_nonstd: non-standard model config tests
    torchscript: torchscript tests
    features: feature extraction tests
    fxforward: torch fx forward tests
    fxbackward: torch fx backward tests
INI

cd "$WORK/tests"
# timm's per-test time limits are sized for its CI runners; TIMEOUT is timm's own knob to
# raise them (the largest presets' pruning test needs more than 360 s on a busy 2-core CPU).
export TIMEOUT=${TIMEOUT:-1800}
"$PYTHON" -m pytest test_models.py -k refiner -p no:cacheprovider "$@"
