#!/usr/bin/env bash
# GPU check of pipegear: build against the CUDA torch found on this machine,
# run the C++ "[cuda]" tests, the Python CUDA tests and benchmarks/bench_gpu.py,
# and write every log plus summary.md to OUTDIR. See docs/gpu.md.
#
#   scripts/gpu_check.sh OUTDIR
#
# Never hangs: every step runs under `timeout`, and the steps share one
# deadline (PIPEGEAR_GPU_CHECK_BUDGET_S, default 450 s). Exit status: 0 if
# everything that ran passed, 1 if a step failed, 2 if there is no CUDA.
#
# Build: CMake (CMakeLists.txt) when a CUDA toolkit (nvcc) is there, since
# torch's CMake package of a CUDA build enables the CUDA language; else, or
# when CMake fails, a direct compiler build of the same sources (one _C
# module holding the library, and pipegear_tests). Both put the module into
# python/pipegear/, importable with PYTHONPATH=$PWD/python.
#
# Knobs (environment): PIPEGEAR_GPU_CHECK_BUDGET_S, PIPEGEAR_GPU_BUILD_DIR
# (build-gpu), PIPEGEAR_GPU_BUILD=auto|cmake|direct, PIPEGEAR_GPU_JOBS (16),
# PIPEGEAR_GPU_CHECK_ALLOW_CPU=1 (dry run of this script on a CPU-only
# machine: builds, the CUDA tests skip, the benchmark exits at once).
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 64
fi
mkdir -p "$1" || exit 64
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 64
BUDGET=${PIPEGEAR_GPU_CHECK_BUDGET_S:-450}
BUILD=${PIPEGEAR_GPU_BUILD_DIR:-build-gpu}
BUILD_KIND=${PIPEGEAR_GPU_BUILD:-auto}
JOBS=${PIPEGEAR_GPU_JOBS:-16}
ALLOW_CPU=${PIPEGEAR_GPU_CHECK_ALLOW_CPU:-0}
START=$SECONDS
SUMMARY=$OUT/summary.md
FAILED=0
declare -a ROWS=()

log() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# Timeout for a step: at most $1 seconds, never past the deadline.
cap() {
  local l; l=$(left)
  if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}
row() { ROWS+=("| $1 | $2 | $3 |"); }

write_summary() {
  {
    echo "# pipegear GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- host: $(hostname 2>/dev/null)"
    echo "- commit: $(timeout 10 git rev-parse --short HEAD 2>/dev/null || echo '?') (+ working tree)"
    echo "- python: ${PY:-none} (${PYVER:-?})"
    echo "- torch: ${TORCHVER:-?}, CUDA ${TORCHCUDA:-?}"
    echo "- GPU: ${GPUNAME:-?}"
    echo "- build: ${BUILT_WITH:-none}"
    echo "- total time: $((SECONDS - START)) s of ${BUDGET} s"
    echo
    echo "| step | result | details |"
    echo "|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    if [ -s "$OUT/bench_gpu.md" ]; then
      echo
      echo "## benchmarks/bench_gpu.py"
      echo
      cat "$OUT/bench_gpu.md"
    fi
    echo
    echo "Logs: $(cd "$OUT" && ls | tr '\n' ' ')"
  } > "$SUMMARY"
  log "summary written to $SUMMARY"
}

finish() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi > "$OUT/nvidia-smi-end.log" 2>&1
  fi
  write_summary
  if [ "$1" -ne 0 ]; then log "FAILED (exit $1)"; else log "all steps passed"; fi
  exit "$1"
}

# Runs a step: NAME SECONDS CMD... ; output to $OUT/NAME.log; returns rc.
run_step() {
  local name=$1 secs=$2; shift 2
  secs=$(cap "$secs")
  if [ "$secs" -le 5 ]; then
    log "$name: skipped, out of time"
    echo "skipped: out of time" > "$OUT/$name.log"
    return 124
  fi
  log "$name (timeout ${secs}s): $*"
  timeout -k 10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    log "$name: TIMED OUT after ${secs}s"
  fi
  log "$name: exit $rc"
  return "$rc"
}

log "root $ROOT, output $OUT, budget ${BUDGET}s"

# ---- machine ---------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader >> "$OUT/nvidia-smi.log" 2>&1
  row nvidia-smi ok "$(tail -1 "$OUT/nvidia-smi.log")"
else
  echo "nvidia-smi not found" > "$OUT/nvidia-smi.log"
  row nvidia-smi missing "-"
fi
{ uname -a; nproc; free -g 2>/dev/null; df -h . 2>/dev/null; } > "$OUT/machine.log" 2>&1

# ---- a python3 with CUDA torch -----------------------------------------------
PY=
declare -a CANDIDATES=()
for c in python3 python python3.12 python3.11 python3.13 python3.10 \
         /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python3 \
         /opt/conda/bin/python "$ROOT/.venv/bin/python"; do
  p=$(command -v "$c" 2>/dev/null) || continue
  case " ${CANDIDATES[*]:-} " in *" $p "*) continue ;; esac
  CANDIDATES+=("$p")
done
: > "$OUT/python.log"
FALLBACK_PY=
for p in "${CANDIDATES[@]}"; do
  info=$(timeout 60 "$p" -c 'import sys, torch
print(sys.version.split()[0], torch.__version__, torch.version.cuda,
      torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      sep="|")' 2>>"$OUT/python.log")
  echo "$p: ${info:-no torch}" >> "$OUT/python.log"
  [ -n "$info" ] && [ -z "$FALLBACK_PY" ] && FALLBACK_PY="$p|$info"
  if [ "$(echo "$info" | cut -d'|' -f4)" = True ]; then
    PY=$p
    break
  fi
done
if [ -z "$PY" ] && [ "$ALLOW_CPU" = 1 ] && [ -n "$FALLBACK_PY" ]; then
  PY=${FALLBACK_PY%%|*}
  info=${FALLBACK_PY#*|}
  log "PIPEGEAR_GPU_CHECK_ALLOW_CPU=1: dry run with $PY (no CUDA)"
fi
if [ -z "$PY" ]; then
  log "no CUDA: none of (${CANDIDATES[*]:-}) has torch with a usable CUDA device"
  row python "FAIL: no CUDA" "no python with CUDA torch; see python.log"
  finish 2
fi
PYVER=$(echo "$info" | cut -d'|' -f1)
TORCHVER=$(echo "$info" | cut -d'|' -f2)
TORCHCUDA=$(echo "$info" | cut -d'|' -f3)
GPUNAME=$(echo "$info" | cut -d'|' -f5)
log "python $PY: torch $TORCHVER, CUDA $TORCHCUDA, $GPUNAME"
row python ok "$PY, Python $PYVER, torch $TORCHVER (CUDA $TORCHCUDA), $GPUNAME"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(dirname "$PY"):$PATH"
export PYTHONDONTWRITEBYTECODE=1
timeout 60 "$PY" - > "$OUT/env.log" 2>&1 <<'EOF'
import importlib, sys
import torch
print("python", sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB",
          f"sm_{p.major}{p.minor}", "count", torch.cuda.device_count())
print("cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
for m in ("pytest", "numpy", "cmake", "ninja"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "missing", type(e).__name__)
print(torch.__config__.show())
EOF

# ---- build tools -------------------------------------------------------------
CXX_BIN=${CXX:-}
if [ -z "$CXX_BIN" ]; then
  for c in c++ g++ clang++; do
    if command -v "$c" >/dev/null 2>&1; then CXX_BIN=$(command -v "$c"); break; fi
  done
fi
# A CUDA toolkit: torch's CMake package of a CUDA build needs nvcc and the
# toolkit's headers (`nvcc` on PATH may be a wrapper script elsewhere).
CUDA_ROOT=
NVCC=
for r in "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
         "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")" \
         /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda /usr; do
  if [ -n "$r" ] && [ -x "$r/bin/nvcc" ] && [ -f "$r/include/cuda_runtime.h" ]; then
    CUDA_ROOT=$r; NVCC=$r/bin/nvcc; break
  fi
done
CCACHE=$(command -v ccache 2>/dev/null)
# A cache inside the build dir: always writable, and a second run on the same
# machine (a rerun after a fix) recompiles nothing.
mkdir -p "$BUILD" && export CCACHE_DIR=${PIPEGEAR_GPU_CCACHE_DIR:-$ROOT/$BUILD/.ccache}
# Catch2 v2 (catch2/catch.hpp; CMake also needs its package config).
CATCH_HDR=$(ls /usr/include/catch2/catch.hpp /usr/local/include/catch2/catch.hpp 2>/dev/null | head -1)
CATCH_CFG=$(timeout 20 find /usr/lib /usr/share /usr/local/lib /usr/local/share /usr/lib64 \
              -maxdepth 5 -name 'Catch2Config.cmake' 2>/dev/null | head -1)
{
  echo "cmake: $(command -v cmake || echo missing) $(timeout 10 cmake --version 2>/dev/null | head -1)"
  echo "ninja: $(command -v ninja || echo missing) $(timeout 10 ninja --version 2>/dev/null)"
  echo "make: $(command -v make || echo missing)"
  echo "c++: ${CXX_BIN:-missing} $(timeout 10 "${CXX_BIN:-false}" --version 2>/dev/null | head -1)"
  echo "nvcc: ${NVCC:-missing} $([ -n "$NVCC" ] && timeout 10 "$NVCC" --version 2>/dev/null | tail -1) (toolkit ${CUDA_ROOT:-none}; nvcc on PATH: $(command -v nvcc || echo none))"
  echo "ccache: ${CCACHE:-missing}"
  echo "catch2: header ${CATCH_HDR:-missing}, config ${CATCH_CFG:-missing}"
} > "$OUT/tools.log"
cat "$OUT/tools.log" >> "$OUT/gpu_check.log"
if [ -z "$CXX_BIN" ]; then
  row build "FAIL: no C++ compiler" "see tools.log"
  finish 1
fi
if [ "$BUILD_KIND" = auto ]; then
  if command -v cmake >/dev/null 2>&1 && { [ -n "$NVCC" ] || [ "$TORCHCUDA" = None ]; }; then
    BUILD_KIND=cmake
  else
    BUILD_KIND=direct
    log "no cmake, or no nvcc for torch's CUDA CMake package: direct build"
  fi
fi
row tools ok "build $BUILD_KIND; $(sed -n 's/^\(cmake\|ninja\|nvcc\): \([^ ]*\).*/\1 \2/p' "$OUT/tools.log" | tr '\n' ';') catch2 ${CATCH_HDR:-missing}"

# ---- build: CMake --------------------------------------------------------------
BUILT_WITH=
EXT=$(timeout 30 "$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
module_imports() {
  timeout 90 "$PY" -c 'import pipegear, sys; print("pipegear", pipegear.__version__, pipegear._C.__file__)' \
    > "$OUT/import.log" 2>&1
}

cmake_build() {
  local tests=OFF gen=() keep=(-k) cuda_args=() rc
  if [ -n "$CATCH_HDR" ] && [ -n "$CATCH_CFG" ]; then tests=ON; fi
  if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); keep=(-k 0)
  else gen=(-G "Unix Makefiles"); fi
  if [ -n "$NVCC" ]; then
    # CMAKE_CUDA_STANDARD: torch would ask for CUDA20, which CMake < 3.26
    # cannot give nvcc; TORCH_CUDA_ARCH_LIST: skips the try_run detection
    # (pipegear has no CUDA sources); nvrtc: torch's targets link it, and a
    # toolkit without it would leave CUDA_nvrtc_LIBRARY NOTFOUND.
    local arch nvrtc
    arch=$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || echo 9.0)
    nvrtc=$(ls "$CUDA_ROOT"/lib64/libnvrtc.so* "$CUDA_ROOT"/lib/libnvrtc.so* \
              "$CUDA_ROOT"/targets/*/lib/libnvrtc.so* 2>/dev/null | head -1)
    if [ -z "$nvrtc" ]; then
      nvrtc=$(timeout 60 "$PY" -c 'import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
print((sorted(glob.glob(site + "/nvidia/**/libnvrtc.so*", recursive=True)) + [""])[0])' 2>/dev/null)
    fi
    if [ -z "$nvrtc" ]; then
      nvrtc=$(ls "$CUDA_ROOT"/lib64/libcudart.so "$CUDA_ROOT"/lib/libcudart.so 2>/dev/null | head -1)
      log "no libnvrtc found; $nvrtc stands in for CUDA_nvrtc_LIBRARY (pipegear never calls nvrtc)"
    fi
    cuda_args=(-DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$CUDA_ROOT"
               -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_STANDARD=17
               -DTORCH_CUDA_ARCH_LIST="$arch")
    [ -n "$nvrtc" ] && cuda_args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  fi
  local prefix
  prefix=$(timeout 60 "$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # --allow-shlib-undefined: the test executable links libtorch_cuda, whose
  # own dependencies (cuBLAS, cuDNN, ... of the nvidia wheels) ld may not
  # find at link time; they load at run time through libtorch_cuda's RPATH.
  run_step configure 120 cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix" -DPython3_EXECUTABLE="$PY" \
    -DPIPEGEAR_BUILD_TESTS=$tests "${cuda_args[@]}" \
    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined
  rc=$?
  if [ $rc -ne 0 ]; then
    row "cmake configure" "FAIL (exit $rc)" "configure.log: $(grep -m1 -iE 'error' "$OUT/configure.log" | cut -c1-150)"
    return 1
  fi
  row "cmake configure" ok "$BUILD, tests $tests, $(grep -m1 -o 'Found Torch.*' "$OUT/configure.log" | cut -c1-60)"
  # Keep going past a failing target: the module may build without the tests.
  local budget=$(( $(left) - 200 ))
  [ "$budget" -lt 150 ] && budget=150
  run_step build "$budget" cmake --build "$BUILD" -j "$JOBS" -- "${keep[@]}"
  rc=$?
  if [ $rc -ne 0 ]; then
    row "cmake build" "FAIL (exit $rc)" "build.log: $(grep -m1 -E 'error|FAILED' "$OUT/build.log" | cut -c1-150)"
  else
    row "cmake build" ok "-j $JOBS"
  fi
  [ "$tests" = ON ] || rm -f "$BUILD/pipegear_tests"
  module_imports || return 1
  BUILT_WITH="cmake ($BUILD)"
  return 0
}

# ---- build: direct (no CMake) ---------------------------------------------------
# The sources of CMakeLists.txt compiled with torch's flags: every .cpp of
# csrc/pipegear and csrc/bindings into python/pipegear/_C<EXT>, and
# csrc/pipegear + tests/cpp into $BUILD/pipegear_tests (if Catch2 v2 is there).
direct_build() {
  local dir="$BUILD/direct"
  mkdir -p "$dir/obj" || return 1
  # Include dirs, the C++ ABI and torch's interface definitions (those of
  # its CMake targets; NCCL left out: its headers need the CUDA toolkit).
  if ! timeout 60 "$PY" - > "$dir/torch.env" 2> "$OUT/direct-torch-env.log" <<'EOF'
import os, re, shlex, sysconfig, torch
tdir = os.path.dirname(torch.__file__)
defs = []
targets = os.path.join(tdir, "share/cmake/Caffe2/Caffe2Targets.cmake")
try:
    text = open(targets).read()
    for block in re.findall(r'INTERFACE_COMPILE_DEFINITIONS "([^"]*)"', text):
        defs += [d for d in block.split(";") if re.fullmatch(r"\w+(=\w+)?", d)]
except OSError:
    pass
if not defs and torch.distributed.is_available():
    defs.append("USE_DISTRIBUTED")
    if torch.distributed.is_gloo_available():
        defs.append("USE_C10D_GLOO")
defs = sorted({d for d in defs if not d.startswith("USE_C10D_NCCL")})
inc = os.path.join(tdir, "include")
print("TORCH_INC=" + shlex.quote(inc))
print("TORCH_LIB=" + shlex.quote(os.path.join(tdir, "lib")))
print("PY_INC=" + shlex.quote(sysconfig.get_paths()["include"]))
print("ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
print("DEFS=" + shlex.quote(" ".join("-D" + d for d in defs)))
EOF
  then
    row "direct build" FAIL "could not query torch; direct-torch-env.log"
    return 1
  fi
  # shellcheck disable=SC1091
  . "$dir/torch.env"
  local std=-std=c++20
  echo 'int main() {}' > "$dir/probe.cpp"
  if ! "$CXX_BIN" -std=c++20 -fsyntax-only "$dir/probe.cpp" 2>/dev/null; then std=-std=c++2a; fi
  local common="$std -O2 -fPIC -D_GLIBCXX_USE_CXX11_ABI=$ABI $DEFS -I$ROOT/csrc -isystem $TORCH_INC -isystem $TORCH_INC/torch/csrc/api/include"
  local py_flags="-isystem $PY_INC -DTORCH_EXTENSION_NAME=_C -DPYBIND11_DETAILED_ERROR_MESSAGES -fvisibility=hidden"
  local catch_flags=""
  if [ -n "$CATCH_HDR" ]; then
    # Not for the compiler's own dirs: -isystem /usr/include breaks
    # libstdc++'s #include_next <stdlib.h>.
    case "$(dirname "$(dirname "$CATCH_HDR")")" in
      /usr/include|/usr/local/include) ;;
      *) catch_flags="-isystem $(dirname "$(dirname "$CATCH_HDR")")" ;;
    esac
  fi
  # One compile: cc.sh SRC OBJ EXTRA_FLAGS (an empty string: none).
  cat > "$dir/cc.sh" <<EOF
#!/usr/bin/env bash
src=\$1; obj=\$2; extra=\$3
if $CCACHE "$CXX_BIN" $common \$extra -c "\$src" -o "\$obj" > "\$obj.log" 2>&1; then
  echo "ok \$src"
else
  echo "FAILED \$src"; head -c 4000 "\$obj.log"; exit 1
fi
EOF
  chmod +x "$dir/cc.sh"
  local -a lib_src bind_src test_src
  mapfile -t lib_src < <(find csrc/pipegear -name '*.cpp' | sort)
  mapfile -t bind_src < <(find csrc/bindings -name '*.cpp' | sort)
  test_src=()
  if [ -n "$CATCH_HDR" ]; then mapfile -t test_src < <(find tests/cpp -maxdepth 1 -name '*.cpp' | sort); fi
  [ -f "$PY_INC/Python.h" ] || log "direct build: no $PY_INC/Python.h, the module will not build"
  : > "$dir/jobs.txt"
  local s
  for s in "${lib_src[@]}"; do printf '%s\0%s\0%s\0' "$s" "$dir/obj/${s//\//_}.o" "" >> "$dir/jobs.txt"; done
  for s in "${bind_src[@]}"; do printf '%s\0%s\0%s\0' "$s" "$dir/obj/${s//\//_}.o" "$py_flags" >> "$dir/jobs.txt"; done
  for s in "${test_src[@]}"; do printf '%s\0%s\0%s\0' "$s" "$dir/obj/${s//\//_}.o" "$catch_flags" >> "$dir/jobs.txt"; done
  local budget=$(( $(left) - 170 ))
  [ "$budget" -lt 120 ] && budget=120
  run_step direct_compile "$budget" xargs -0 -n 3 -P "$JOBS" -a "$dir/jobs.txt" "$dir/cc.sh"
  local crc=$?
  local -a lib_obj=() bind_obj=() test_obj=()
  for s in "${lib_src[@]}"; do lib_obj+=("$dir/obj/${s//\//_}.o"); done
  for s in "${bind_src[@]}"; do bind_obj+=("$dir/obj/${s//\//_}.o"); done
  for s in "${test_src[@]}"; do test_obj+=("$dir/obj/${s//\//_}.o"); done
  local torch_libs=(-L"$TORCH_LIB" -Wl,-rpath,"$TORCH_LIB" -Wl,--no-as-needed)
  local l
  for l in torch_cuda c10_cuda; do
    [ -e "$TORCH_LIB/lib$l.so" ] && torch_libs+=("-l$l")
  done
  torch_libs+=(-ltorch -ltorch_cpu -lc10 -Wl,--as-needed -lpthread)
  local ok_mod=1 ok_tests=1
  rm -f "python/pipegear/_C$EXT"
  if ! timeout -k 5 "$(cap 120)" "$CXX_BIN" -shared -o "python/pipegear/_C$EXT" \
      "${lib_obj[@]}" "${bind_obj[@]}" "${torch_libs[@]}" -ltorch_python \
      > "$OUT/direct_link.log" 2>&1; then
    ok_mod=0
  fi
  rm -f "$BUILD/pipegear_tests"
  if [ ${#test_obj[@]} -gt 0 ]; then
    if ! timeout -k 5 "$(cap 120)" "$CXX_BIN" -o "$BUILD/pipegear_tests" \
        "${lib_obj[@]}" "${test_obj[@]}" "${torch_libs[@]}" \
        -Wl,--allow-shlib-undefined >> "$OUT/direct_link.log" 2>&1; then
      ok_tests=0
    fi
  fi
  local what="compile exit $crc; module $([ $ok_mod = 1 ] && echo linked || echo FAILED)"
  what="$what; tests $([ ${#test_obj[@]} -eq 0 ] && echo 'skipped (no Catch2 v2)' || { [ $ok_tests = 1 ] && echo linked || echo FAILED; })"
  if [ $crc -ne 0 ] || [ $ok_mod = 0 ] || [ $ok_tests = 0 ]; then
    row "direct build" "FAIL" "$what; direct_compile.log, direct_link.log"
  else
    row "direct build" ok "$what"
  fi
  [ $ok_mod = 1 ] || return 1
  module_imports || return 1
  BUILT_WITH="direct ($BUILD/direct, $CXX_BIN)"
  return 0
}

BUILD_OK=0
if [ "$BUILD_KIND" = cmake ]; then
  if cmake_build; then
    BUILD_OK=1
  elif [ "$(left)" -gt 200 ]; then
    log "CMake build gave no importable module; trying the direct build"
    direct_build && BUILD_OK=1
  fi
else
  direct_build && BUILD_OK=1
fi
if [ $BUILD_OK = 1 ]; then
  row "import pipegear" ok "$(tail -1 "$OUT/import.log" | cut -c1-150)"
else
  row "import pipegear" FAIL "$(tail -1 "$OUT/import.log" 2>/dev/null | cut -c1-150)"
  FAILED=1
fi

# ---- C++ tests ---------------------------------------------------------------
if [ ! -x "$BUILD/pipegear_tests" ]; then
  if [ -z "$CATCH_HDR" ]; then row "C++ [cuda]" skipped "Catch2 v2 not found"
  else row "C++ [cuda]" "FAIL: not built" "see the build logs"; FAILED=1; fi
else
  run_step cpp_cuda_tests 90 "$BUILD/pipegear_tests" "[cuda]" --durations yes
  rc=$?
  counts=$(grep -E '^(test cases|All tests passed|assertions)' "$OUT/cpp_cuda_tests.log" | tr '\n' ' ')
  skipped=$(grep -c 'no CUDA' "$OUT/cpp_cuda_tests.log")
  if [ $rc -eq 0 ]; then row "C++ [cuda]" ok "$counts (returned early without CUDA: $skipped)"
  else row "C++ [cuda]" "FAIL (exit $rc)" "$counts"; FAILED=1; fi
fi

# ---- Python CUDA tests --------------------------------------------------------
if [ $BUILD_OK = 1 ]; then
  # Same cuBLAS results on every stream (the replay test compares bitwise).
  export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
  if timeout 60 "$PY" -c 'import pytest' >/dev/null 2>&1; then
    run_step python_cuda_tests 200 "$PY" -m pytest -v -rfEs -m cuda \
      -p no:cacheprovider -o addopts="" --durations=5 tests/python/test_cuda.py
    rc=$?
    counts=$(grep -E '=+ .*(passed|failed|skipped|error).* =+$' "$OUT/python_cuda_tests.log" | tail -1 | tr -d '=')
  else
    run_step python_cuda_tests 200 "$PY" tests/python/test_cuda.py
    rc=$?
    counts="(no pytest) $(grep -E '^[0-9]+ passed' "$OUT/python_cuda_tests.log" | tail -1)"
  fi
  unset CUBLAS_WORKSPACE_CONFIG
  grep -q '^Timeout (' "$OUT/python_cuda_tests.log" && counts="$counts; a test HUNG (watchdog stack dump in the log)"
  failed_tests=$(grep -oE '^(FAILED|ERROR) [^ ]+' "$OUT/python_cuda_tests.log" | sed 's/.*:://' | sort -u | tr '\n' ' ')
  if [ $rc -eq 0 ]; then row "Python CUDA tests" ok "$counts"
  else row "Python CUDA tests" "FAIL (exit $rc)" "$counts; ${failed_tests:-see log}"; FAILED=1; fi
else
  row "Python CUDA tests" skipped "no importable module"
fi

# ---- benchmark ---------------------------------------------------------------
if [ $BUILD_OK = 1 ]; then
  BENCH_S=$(cap 240)
  export PIPEGEAR_BENCH_BUDGET_S=$((BENCH_S > 40 ? BENCH_S - 25 : 15))
  run_step bench_gpu 240 "$PY" benchmarks/bench_gpu.py --markdown "$OUT/bench_gpu.md"
  rc=$?
  if [ $rc -eq 0 ]; then row bench_gpu ok "$(grep -m1 'K=1' "$OUT/bench_gpu.md" 2>/dev/null | cut -c1-120 || echo 'tables below')"
  else row bench_gpu "FAIL (exit $rc)" "see bench_gpu.log"; FAILED=1; fi
else
  row bench_gpu skipped "no importable module"
fi

finish $FAILED
