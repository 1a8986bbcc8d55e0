# Source this to build fer-cam's `cuda` feature without a system CUDA install:
#
#   source scripts/cuda-env.sh [VENV]        # VENV defaults to $FER_CAM_CUDA_VENV or ./.cuda-venv
#   cargo build --release --features cuda
#
# It installs NVIDIA's CUDA 13.0 toolkit wheels from PyPI into VENV (once), makes a folder of
# link names for the versioned libraries and a link-only stub of the driver library libcuda
# (the driver itself comes with the NVIDIA driver on the machine that runs the binary), and
# exports what candle's and cudarc's build scripts read. With a system toolkit instead, set
# CUDA_HOME, put its bin on PATH and set CUDA_COMPUTE_CAP yourself.
#
# CUDA_COMPUTE_CAP picks the GPU generation candle's kernels are compiled for (90: H100/H200;
# 80: A100; 89: L4/RTX 40xx; 86: RTX 30xx). fer-cam's own kernels are compiled at run time by
# NVRTC for whatever GPU is present. ONLY_CHECK=1 installs the smaller set that `cargo check`
# and scripts/nvrtc-check.py need (no cuBLAS or cuRAND, no link folder).

_fc_venv="${1:-${FER_CAM_CUDA_VENV:-$PWD/.cuda-venv}}"
_fc_extras="nvcc,crt,nvvm,cudart,cccl,nvrtc"
[ -n "${ONLY_CHECK:-}" ] || _fc_extras="$_fc_extras,cublas,curand"
if [ ! -x "$_fc_venv/bin/pip" ]; then
  python3 -m venv "$_fc_venv" || return 1
fi
_fc_site=$("$_fc_venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
_fc_cuda="$_fc_site/nvidia/cu13"
if [ ! -x "$_fc_cuda/bin/nvcc" ] || [ ! -e "$_fc_cuda/lib/libnvrtc.so.13" ] ||
  { [ -z "${ONLY_CHECK:-}" ] && [ ! -e "$_fc_cuda/lib/libcublas.so.13" ]; }; then
  # crt and nvvm pinned: nvcc's own requirement on them is unpinned.
  "$_fc_venv/bin/pip" install -q "cuda-toolkit[$_fc_extras]==13.0.2" || return 1
fi
export CUDA_HOME="$_fc_cuda"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
if [ -z "${ONLY_CHECK:-}" ]; then
  _fc_link="$_fc_venv/cuda-link"
  mkdir -p "$_fc_link"
  for _fc_l in cudart nvrtc cublas cublasLt; do
    ln -sf "$CUDA_HOME/lib/lib$_fc_l.so.13" "$_fc_link/lib$_fc_l.so"
  done
  ln -sf "$CUDA_HOME/lib/libcurand.so.10" "$_fc_link/libcurand.so"
  if [ ! -e "$_fc_link/libcuda.so" ]; then
    # Link-time stand-in for the driver: every cu* name in cuda.h, each returning
    # CUDA_ERROR_STUB_LIBRARY (34). Never loaded at run time: the real libcuda.so.1 is.
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$CUDA_HOME/include/cuda.h" | sort -u |
      awk '{print "int "$1"(void){return 34;}"}' > "$_fc_link/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_fc_link/libcuda.so" "$_fc_link/libcuda_stub.c" || return 1
  fi
  export LIBRARY_PATH="$_fc_link${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
echo "cuda-env: CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
unset _fc_venv _fc_extras _fc_site _fc_cuda _fc_link _fc_l
