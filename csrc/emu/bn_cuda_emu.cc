// csrc/kernels/bn_cuda.cu compiled as C++ for the CPU emulator: the include
// path puts csrc/emu/include (cuda_runtime.h, cooperative_groups.h) before
// the CUDA toolkit's headers, which give the half and bfloat16 types.
#include "bn_cuda.cu"
