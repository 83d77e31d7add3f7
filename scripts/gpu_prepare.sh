#!/usr/bin/env bash
# For a GPU machine without a package registry whose python (3.12, with a CUDA torch) lacks fairseq.
# Run on a machine with PyPI and this repository's .venv (Python 3.11); builds .gpu_site/:
#   - fairseq's Python sources with its two Cython extensions compiled for cp312 (and for cp311, so
#     that the import check at the end can run with .venv's python);
#   - omegaconf, hydra-core, antlr4 and bitarray;
#   - the C++ source of fairseq's libbase (BASE layers' auction), which scripts/gpu_check.sh compiles
#     on the GPU machine against its torch.
# Copy .gpu_site/ beside the repository on the GPU machine and run `bash scripts/gpu_check.sh` there.
#   PY312=path  the Python 3.12 to build with (default: python3.12)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.gpu_site"
if [ -z "${PY312:-}" ]; then
  PY312=python3.12
  v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -1 || true)"
  [ -n "$v" ] && PY312="$(pyenv prefix "$v")/bin/python3.12"
fi
VENV_PY="$ROOT/.venv/bin/python"  # has torch: fairseq's setup.py imports it to read its metadata
FAIRSEQ="fairseq-fixed==0.12.3.1"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
rm -rf "$DEST" && mkdir -p "$DEST"

"$PY312" -m venv "$TMP/v312"
"$TMP/v312/bin/pip" install -q numpy cython setuptools
# pure-Python and cp312 packages (antlr4's is an sdist, built with this python)
"$TMP/v312/bin/pip" install -q --no-deps --no-compile --target "$DEST" \
  "omegaconf==2.3.0" "hydra-core==1.3.2" "antlr4-python3-runtime==4.9.3" bitarray

# bitarray's cp311 extension beside the cp312 one, for the check below (the same release)
BITARRAY="$(basename "$DEST"/bitarray-*.dist-info .dist-info | sed 's/-/==/')"
"$VENV_PY" -m pip install -q --no-deps --no-compile --target "$TMP/b311" "$BITARRAY"
cp "$TMP"/b311/bitarray/*.so "$DEST/bitarray/"

"$VENV_PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "$FAIRSEQ" -d "$TMP/sdist"
tar xzf "$TMP"/sdist/fairseq_fixed-*.tar.gz -C "$TMP"
SRC="$(echo "$TMP"/fairseq_fixed-*/)"
# fairseq's sources without its examples (17 MB; imported only by example models)
(cd "$SRC" && tar cf - --exclude=fairseq/examples --exclude='*.cpp' --exclude='*.cu' fairseq fairseq_cli) | tar xf - -C "$DEST"
# libbase's C++ source: built on the GPU machine (its torch's headers and ABI)
mkdir -p "$DEST/fairseq/clib/libbase" && cp "$SRC/fairseq/clib/libbase/balanced_assignment.cpp" "$DEST/fairseq/clib/libbase/"
cat > "$TMP/build_ext.py" <<'EOF'
import sys
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

names = ["fairseq.data.data_utils_fast", "fairseq.data.token_block_utils_fast"]
exts = [Extension(n, [n.replace(".", "/") + ".pyx"], language="c++", include_dirs=[numpy.get_include()],
                  extra_compile_args=["-std=c++11", "-O3"]) for n in names]
setup(name="fairseq_fast", ext_modules=cythonize(exts, language_level=3, quiet=True),
      script_args=["build_ext", "--inplace", "-j", "2"])
EOF
for py in "$TMP/v312/bin/python" "$VENV_PY"; do
  (cd "$DEST" && rm -f fairseq/data/*_fast.cpp && "$py" "$TMP/build_ext.py" >/dev/null && rm -rf build)
done
rm -rf "$DEST"/fairseq/data/*.cpp "$DEST"/bin
"$VENV_PY" -c "import sys; sys.path.insert(0, '$DEST'); import fairseq, fairseq.data.data_utils_fast, omegaconf, hydra; \
assert fairseq.__file__.startswith('$DEST'), fairseq.__file__; print('[gpu_prepare] fairseq', fairseq.__version__, 'imports from .gpu_site (cp311 check)')"
ls "$DEST"/fairseq/data/*.so
du -sh "$DEST"
