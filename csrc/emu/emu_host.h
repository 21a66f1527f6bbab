// Host-side API of the CPU emulator of the CUDA kernels (csrc/emu) for code
// that does not include its cuda_runtime.h: emulated device memory, which is
// host memory, 256-byte aligned and of exactly the requested size (so that
// AddressSanitizer reports any access past it).
#pragma once

#include <cstddef>

namespace fused_bn_emu {

void* device_malloc(size_t bytes);  // nullptr when out of memory
void device_free(void* p);

}  // namespace fused_bn_emu
