// CPU backend and registrations. Kernels run on TensorFlow's intra-op pool.
#include <cstring>

#include "kernels.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace fused_bn_tf {

using CPUDevice = Eigen::ThreadPoolDevice;

namespace {
kernels::cpu::ParallelFor PoolOf(OpKernelContext* ctx) {
  thread::ThreadPool* pool =
      ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost,
                const std::function<void(int64_t, int64_t)>& fn) {
    pool->ParallelFor(n, cost, fn);
  };
}
}  // namespace

template <>
struct Backend<CPUDevice> {
  static absl::Status Forward(OpKernelContext* ctx, kernels::ForwardParams p) {
    return ToStatus(kernels::cpu::forward(p, PoolOf(ctx)));
  }
  static absl::Status Backward(OpKernelContext* ctx,
                               kernels::BackwardParams p) {
    return ToStatus(kernels::cpu::backward(p, PoolOf(ctx)));
  }
  static absl::Status Moments(OpKernelContext* ctx, kernels::MomentsParams p) {
    return ToStatus(kernels::cpu::moments(p, PoolOf(ctx)));
  }
  static absl::Status Normalize(OpKernelContext* ctx,
                                kernels::NormalizeParams p) {
    return ToStatus(kernels::cpu::normalize(p, PoolOf(ctx)));
  }
  static absl::Status Update(OpKernelContext*, kernels::UpdateParams p) {
    return ToStatus(kernels::cpu::update_moving_stats(p));
  }
  static absl::Status Copy(OpKernelContext*, void* dst, const void* src,
                           size_t bytes) {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
};

FUSED_BN_REGISTER_TU(DEVICE_CPU, CPUDevice, Eigen::half, float);
FUSED_BN_REGISTER_TU(DEVICE_CPU, CPUDevice, bfloat16, float);
FUSED_BN_REGISTER_TU(DEVICE_CPU, CPUDevice, float, float);
FUSED_BN_REGISTER_TU(DEVICE_CPU, CPUDevice, double, double);
FUSED_BN_REGISTER_U(DEVICE_CPU, CPUDevice, float);
FUSED_BN_REGISTER_U(DEVICE_CPU, CPUDevice, double);

}  // namespace fused_bn_tf
}  // namespace tensorflow
