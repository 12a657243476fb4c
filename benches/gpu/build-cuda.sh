#!/usr/bin/env bash
# Builds semtel with `--features cuda` on a machine WITHOUT a CUDA toolkit or GPU (as this
# project's CPU box), for carrying to a GPU machine that has no Rust. Not run in CI.
#   - nvcc 13.0, headers and CUDA libraries come from NVIDIA's PyPI wheels (pip download);
#   - libcuda (the driver) is not on PyPI: a stub with the driver API's names satisfies the
#     linker; the GPU machine's real libcuda.so.1 is loaded at run time.
# On a machine with the CUDA toolkit, plain `cargo build --release --features cuda` is enough.
# Output: target/cuda/release/semtel (and gpu/semtel.xz, for the device's 64 MiB carry limit).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=target/cuda-toolkit
if [ ! -x "$T/x/nvidia/cu13/bin/nvcc" ]; then
  mkdir -p "$T"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" \
    "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand==10.4.*" -d "$T"
  for w in "$T"/*.whl; do unzip -q -o "$w" -d "$T/x"; done
fi
C=$(cd "$T/x/nvidia/cu13" && pwd)
(cd "$C/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf lib$l.so.13 lib$l.so; done \
  && ln -sf libcurand.so.10 libcurand.so)
if [ ! -f "$C/lib/libcuda.so" ]; then
  R=$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
      | python3 -c "import sys,json; print(next(p['manifest_path'] for p in json.load(sys.stdin)['packages'] if p['name']=='cudarc'))")
  grep -oE "pub unsafe fn cu[A-Za-z0-9_]+" "$(dirname "$R")/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > "$T/cudastub.c"
  gcc -shared -fPIC -o "$C/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$T/cudastub.c"
fi
export PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_PATH="$C" CUDA_HOME="$C" LIBRARY_PATH="$C/lib"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CARGO_PROFILE_RELEASE_STRIP=true
cargo build --release --features cuda --target-dir target/cuda --bin semtel
mkdir -p gpu && xz -T0 -6 -c target/cuda/release/semtel > gpu/semtel.xz
echo "built target/cuda/release/semtel (sm_$CUDA_COMPUTE_CAP) and gpu/semtel.xz"
