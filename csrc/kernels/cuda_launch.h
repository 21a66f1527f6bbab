// One way to launch a kernel, for nvcc and for the CPU emulator of the CUDA
// kernels (csrc/emu, a test-only backend that compiles the .cu as C++):
//   launch<kernel>(grid, block, smem, stream, args...)
// is kernel<<<grid, block, smem, stream>>>(args...) under nvcc; errors are
// read with cudaGetLastError() as after <<<>>>.
//   launch_cooperative<kernel>(grid, block, smem, stream, args...)
// is cudaLaunchCooperativeKernel (every block resident at once, so the kernel
// may call cooperative_groups::this_grid().sync()); it returns the error.
//   FUSED_BN_DYNAMIC_SHARED(T, name);
// declares `name`, the block's dynamic shared memory (`smem` bytes) as T[].
#pragma once

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>
#include <utility>

#ifdef __CUDACC__
#define FUSED_BN_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#else
#define FUSED_BN_DYNAMIC_SHARED(T, name) \
  T* const name = ::fused_bn_emu::dynamic_shared<T>()
#endif

namespace fused_bn {
namespace cuda {

template <auto Kernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
#ifdef __CUDACC__
  Kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#else
  ::fused_bn_emu::launch<Kernel>(grid, block, smem, stream, false,
                                 std::forward<Args>(args)...);
#endif
}

namespace launch_detail {
template <typename F>
struct Params;
template <typename... P>
struct Params<void (*)(P...)> {
  using type = std::tuple<std::remove_cv_t<P>...>;
};
}  // namespace launch_detail

template <auto Kernel, typename... Args>
inline cudaError_t launch_cooperative(dim3 grid, dim3 block, size_t smem,
                                      cudaStream_t stream, Args&&... args) {
#ifdef __CUDACC__
  // The runtime copies each parameter from a pointer to exactly its type.
  typename launch_detail::Params<decltype(Kernel)>::type params(
      std::forward<Args>(args)...);
  return std::apply(
      [&](auto&... p) {
        void* ptrs[] = {static_cast<void*>(&p)..., nullptr};
        return cudaLaunchCooperativeKernel(Kernel, grid, block, ptrs, smem,
                                           stream);
      },
      params);
#else
  ::fused_bn_emu::launch<Kernel>(grid, block, smem, stream, true,
                                 std::forward<Args>(args)...);
  return cudaPeekAtLastError();
#endif
}

}  // namespace cuda
}  // namespace fused_bn
