#!/usr/bin/env bash
# Build (once) or reuse the llama.cpp peer and install llama-cpp-python into a venv.
#
#   scripts/peer.sh [VENV]        (VENV defaults to .venv)
#
# The peer is used only by tests and benchmarks; the runtime never imports llama_cpp.
#
# One compile, not two: llama-cpp-python's sdist vendors llama.cpp and builds it with
# add_subdirectory(), where llama.cpp's tools are off by default. We turn them on in the
# same CMake pass (-DLLAMA_BUILD_TOOLS=ON), keep scikit-build-core's build folder
# (SKBUILD_BUILD_DIR) and only build the targets we need (SKBUILD_BUILD_TARGETS), so a
# single `pip wheel` yields the wheel *and* llama-perplexity/-bench/-quantize/-imatrix
# linked against the very same libllama/libggml. Notes on the flags:
#  - LLAVA_BUILD=OFF: with tools on, llama.cpp adds tools/mtmd itself; the sdist's own
#    add_subdirectory(tools/mtmd) would define the target twice. mtmd is still built
#    (its install rule is unconditional) but lands in the wheel's lib/, not llama_cpp/lib,
#    so llama_cpp's multimodal chat handlers are unavailable: we do not use them.
#  - LLAMA_BUILD_SERVER=OFF: llama-server is the slowest tool to compile; not needed.
#  - CMAKE_BUILD_RPATH_USE_ORIGIN=ON: tools and libs share build/bin, so the tools get
#    RUNPATH $ORIGIN and the copied bin/ folder is self-contained.
#  - pip --no-cache-dir: pip's wheel cache is keyed by the sdist only, not by CMAKE_ARGS,
#    so it could hand back a wheel built with other flags.
#
# Cache: ${EDGE_RT_HOME:-$HOME/.cache/edge-rt}/peer/llama-cpp-python-<version>/
#   wheel/  the built wheel (21 MB)    bin/  tools + their .so (16 MB)
#   sdist/  the PyPI sdist, only while a build is under way
#   RECIPE   what was built (version, flags, targets, CPU flags, compiler): a change rebuilds
#   BUILD_INFO  command lines, build time, llama.cpp system info      build.log
set -euo pipefail

VERSION=0.3.36   # keep in step with tests/peer.py
VENV=${1:-.venv}
EDGE_RT_HOME=${EDGE_RT_HOME:-$HOME/.cache/edge-rt}
PEER=$EDGE_RT_HOME/peer/llama-cpp-python-$VERSION
PEER_CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"
TOOLS="llama-perplexity llama-bench llama-quantize llama-imatrix"
TARGETS="llama;ggml;ggml-base;ggml-cpu;llama-common;mtmd;${TOOLS// /;}"
JOBS=$(nproc 2>/dev/null || echo 2)

die() { echo "peer.sh: ERROR: $*" >&2; exit 1; }
log() { echo "peer.sh: $*" >&2; }

PY=$VENV/bin/python
[ -x "$PY" ] || die "no Python at $PY (create the venv first, or pass its path as \$1)"
command -v cc >/dev/null && command -v c++ >/dev/null \
    || die "a C/C++ compiler is needed (apt-get install build-essential)"

cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' \
    | grep -E '^(sse4_2|avx|avx2|fma|f16c|avx512.*|avx_vnni|amx.*)$' | sort | tr '\n' ' ' || true)
RECIPE="llama-cpp-python==$VERSION
CMAKE_ARGS=$PEER_CMAKE_ARGS
targets=$TARGETS
cpu=$cpu_flags
cc=$(cc --version | head -1)"

have_build() {
    [ -f "$PEER/RECIPE" ] && [ "$(cat "$PEER/RECIPE")" = "$RECIPE" ] || return 1
    ls "$PEER"/wheel/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1 || return 1
    local t; for t in $TOOLS; do [ -x "$PEER/bin/$t" ] || return 1; done
}

build() {
    local work=$PEER/work t0 t1 sdist
    rm -rf "$work" "$PEER/wheel" "$PEER/bin" "$PEER/RECIPE" "$PEER/BUILD_INFO"
    mkdir -p "$work" "$PEER/sdist"
    sdist=$(ls "$PEER"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
    if [ -z "$sdist" ]; then
        log "downloading the llama-cpp-python==$VERSION sdist"
        "$PY" -m pip download --no-deps --no-binary llama-cpp-python --no-cache-dir -q \
            "llama-cpp-python==$VERSION" -d "$PEER/sdist" \
            || die "could not download the llama-cpp-python==$VERSION sdist from PyPI"
        sdist=$(ls "$PEER"/sdist/llama_cpp_python-"$VERSION".tar.gz) \
            || die "sdist not found after download in $PEER/sdist"
    fi
    log "building llama-cpp-python $VERSION + llama.cpp tools ($JOBS jobs, ~10 min on 2 cores); log: $PEER/build.log"
    t0=$(date +%s)
    if ! CMAKE_ARGS="$PEER_CMAKE_ARGS" SKBUILD_BUILD_DIR="$work/build" \
        SKBUILD_BUILD_TARGETS="$TARGETS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$PY" -m pip wheel --no-deps --no-cache-dir -v "$sdist" -w "$work/wheel" \
        >"$PEER/build.log" 2>&1; then
        tail -n 40 "$PEER/build.log" >&2
        die "building llama-cpp-python failed; full log: $PEER/build.log"
    fi
    t1=$(date +%s)
    mkdir -p "$work/bin"
    for t in $TOOLS; do
        [ -x "$work/build/bin/$t" ] || die "tool $t was not built (see $PEER/build.log)"
        cp -a "$work/build/bin/$t" "$work/bin/"
    done
    cp -a "$work"/build/bin/lib*.so* "$work/bin/"
    if ldd "$work/bin/llama-perplexity" | grep -q 'not found'; then
        ldd "$work/bin/llama-perplexity" >&2
        die "llama-perplexity has unresolved libraries"
    fi
    "$work/bin/llama-perplexity" --version >/dev/null 2>&1 \
        || die "llama-perplexity does not run: $("$work/bin/llama-perplexity" --version 2>&1 | tail -3)"
    mv "$work/bin" "$PEER/bin"
    mv "$work/wheel" "$PEER/wheel"
    rm -rf "$work"   # the build tree (objects) is ~0.5 GB and not needed again
    rm -rf "$PEER/sdist"   # 74 MB; a rebuild (new RECIPE) downloads it again in seconds
    {
        echo "built: $(date -u +%FT%TZ) in $((t1 - t0)) s on $JOBS jobs"
        echo "command: CMAKE_ARGS=\"$PEER_CMAKE_ARGS\" SKBUILD_BUILD_DIR=$work/build SKBUILD_BUILD_TARGETS=\"$TARGETS\" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS $PY -m pip wheel --no-deps --no-cache-dir -v $sdist -w $work/wheel"
        echo "llama.cpp: $("$PEER/bin/llama-perplexity" --version 2>&1 | grep -i version | head -1)"
    } >"$PEER/BUILD_INFO"
    printf '%s\n' "$RECIPE" >"$PEER/RECIPE"   # written last: marks the build complete
    log "built in $((t1 - t0)) s"
}

lib_hash() { [ -f "$1" ] && sha256sum "$1" | cut -d' ' -f1 || true; }  # empty when not installed
# The wheel's libs are stripped copies (cmake --install --strip), so identify the
# installed build by the hash of llama_cpp/lib/libllama.so inside the wheel.
wheel_lib_hash() {
    "$PY" -c 'import hashlib, sys, zipfile
print(hashlib.sha256(zipfile.ZipFile(sys.argv[1]).read("llama_cpp/lib/libllama.so")).hexdigest())' "$1"
}

install_wheel() {
    local whl site want have
    whl=$(ls "$PEER"/wheel/llama_cpp_python-"$VERSION"-*.whl | head -1)
    want=$(wheel_lib_hash "$whl") || die "cannot read llama_cpp/lib/libllama.so from $whl"
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
    have=$(lib_hash "$site/llama_cpp/lib/libllama.so")
    if [ -n "$have" ] && [ "$have" = "$want" ]; then
        log "llama-cpp-python $VERSION (this build) already installed in $VENV"
        return
    fi
    log "installing $(basename "$whl") into $VENV"
    "$PY" -m pip install -q "$whl" || die "pip install $whl failed"   # pulls its few deps
    have=$(lib_hash "$site/llama_cpp/lib/libllama.so")
    if [ "$have" != "$want" ]; then   # another build of the same version was there
        "$PY" -m pip install -q --no-deps --force-reinstall "$whl" || die "pip install $whl failed"
        have=$(lib_hash "$site/llama_cpp/lib/libllama.so")
        [ "$have" = "$want" ] || die "installed llama_cpp does not match $whl"
    fi
}

mkdir -p "$EDGE_RT_HOME/peer"
exec 9>"$EDGE_RT_HOME/peer/.lock"
flock 9 || die "cannot lock $EDGE_RT_HOME/peer/.lock"
if have_build; then
    log "reusing the cached build in $PEER"
else
    build
fi
install_wheel
"$PY" -c 'import llama_cpp' 2>/dev/null \
    || die "llama_cpp does not import in $VENV: $("$PY" -c 'import llama_cpp' 2>&1 | tail -2)"
if ! grep -q '^system_info:' "$PEER/BUILD_INFO" 2>/dev/null; then
    echo "system_info: $("$PY" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())')" \
        >>"$PEER/BUILD_INFO"
fi

echo "llama-cpp-python $VERSION installed in $VENV"
echo "llama.cpp tools in $PEER/bin:"
for t in $TOOLS; do echo "  $PEER/bin/$t"; done
