// cooperative_groups.h of the CPU emulator (see cuda_runtime.h here): the
// grid and block groups of the calling thread. this_grid().sync() is a grid
// barrier, valid in kernels started by launch_cooperative (cuda_launch.h).
#pragma once

#include <cuda_runtime.h>

namespace cooperative_groups {

class thread_block {
 public:
  void sync(const char* file = __builtin_FILE(),
            int line = __builtin_LINE()) const {
    __syncthreads(file, line);
  }
  unsigned long long size() const {
    return 1ull * blockDim.x * blockDim.y * blockDim.z;
  }
  unsigned long long thread_rank() const {
    return threadIdx.x + 1ull * blockDim.x * (threadIdx.y + 1ull * blockDim.y * threadIdx.z);
  }
  dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  dim3 thread_index() const {
    return dim3(threadIdx.x, threadIdx.y, threadIdx.z);
  }
};

class grid_group {
 public:
  void sync(const char* file = __builtin_FILE(),
            int line = __builtin_LINE()) const {
    ::fused_bn_emu::grid_sync(file, line);
  }
  unsigned long long num_blocks() const {
    return 1ull * gridDim.x * gridDim.y * gridDim.z;
  }
  unsigned long long block_rank() const {
    return blockIdx.x + 1ull * gridDim.x * (blockIdx.y + 1ull * gridDim.y * blockIdx.z);
  }
  unsigned long long size() const {
    return num_blocks() * blockDim.x * blockDim.y * blockDim.z;
  }
  unsigned long long thread_rank() const {
    return block_rank() * blockDim.x * blockDim.y * blockDim.z +
           thread_block().thread_rank();
  }
};

inline thread_block this_thread_block() { return thread_block(); }
inline grid_group this_grid() { return grid_group(); }

}  // namespace cooperative_groups
