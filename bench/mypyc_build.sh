#!/bin/sh
# Compile broker's hot modules with mypyc into a worktree (the one given), in place:
# each module's .so lands beside its .py (an extension module is imported first) and the shared
# library at the worktree's root. Run from outside the worktree: the venv's setuptools (65)
# cannot read pyproject.toml's `license = "MIT"`, so the build runs in /tmp/mypyc-build with a
# symlink to the package and the project's mypy settings.
set -e
TREE=${1:?usage: mypyc_build.sh WORKTREE}
MODULES=${MODULES:-"protocol/topics protocol/frames protocol/codes core/outbound core/hub core/session core/delivery core/stats core/permissions core/ratelimit io/writes io/websocket io/connection"}
BUILD=/tmp/mypyc-build
rm -rf "$BUILD" && mkdir -p "$BUILD" && cd "$BUILD"
ln -s "$TREE/broker" broker
printf '[mypy]\npython_version = 3.11\nstrict = True\n\n[mypy-msgpack,msgpack.*]\nignore_missing_imports = True\n' > mypy.ini
find "$TREE/broker" -name '*.so' -delete
rm -f "$TREE"/*__mypyc*.so
/work/main/.venv/bin/mypyc $(for m in $MODULES; do printf 'broker/%s.py ' "$m"; done) > build.log 2>&1 || { grep -E "error" build.log; exit 1; }
cp "$BUILD"/*__mypyc*.so "$TREE"/
echo "compiled: $(find "$TREE/broker" -name '*.so' | wc -l) modules into $TREE"
