// GPU backend and registrations: the OpKernels of kernels.h on
// Eigen::GpuDevice, calling the CUDA launchers of bn_cuda.h on the op's
// stream. Workspaces come from allocate_temp (stream-ordered, 256-byte
// aligned by TF's GPU allocator). float64 has no GPU kernel.
#define EIGEN_USE_GPU

#include <cuda_runtime.h>

#include "bn_cuda.h"
#include "cuda_driver.h"
#include "kernels.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tensorflow {
namespace fused_bn_tf {

using GPUDevice = Eigen::GpuDevice;

namespace {

cudaStream_t StreamOf(OpKernelContext* ctx) {
  return ctx->eigen_device<GPUDevice>().stream();
}

// A temporary device buffer of `bytes` (none when 0), alive while *t is.
absl::Status Workspace(OpKernelContext* ctx, size_t bytes, Tensor* t,
                       void** ptr) {
  *ptr = nullptr;
  if (bytes == 0) return absl::OkStatus();
  TF_RETURN_IF_ERROR(ctx->allocate_temp(
      DT_UINT8, TensorShape({static_cast<int64_t>(bytes)}), t));
  *ptr = t->data();
  return absl::OkStatus();
}

// The statically linked CUDA runtime needs a driver of its CUDA major
// version or newer (cuda_driver.h): say so clearly, once, instead of failing
// every launch with cudaErrorInsufficientDriver.
absl::Status DriverStatus() {
  static const absl::Status status = [] {
    int driver = 0;
    cudaDriverGetVersion(&driver);
    const kernels::Status s = kernels::cuda::driver_check(driver, CUDART_VERSION);
    return s.ok() ? absl::OkStatus() : errors::FailedPrecondition(s.message);
  }();
  return status;
}

}  // namespace

template <>
struct Backend<GPUDevice> {
  static absl::Status Forward(OpKernelContext* ctx, kernels::ForwardParams p) {
    TF_RETURN_IF_ERROR(DriverStatus());
    Tensor ws;
    TF_RETURN_IF_ERROR(Workspace(
        ctx, kernels::cuda::forward_workspace_bytes(p.shape, p.dtype), &ws,
        &p.workspace));
    return ToStatus(kernels::cuda::forward(p, StreamOf(ctx)));
  }
  static absl::Status Backward(OpKernelContext* ctx,
                               kernels::BackwardParams p) {
    TF_RETURN_IF_ERROR(DriverStatus());
    Tensor ws;
    TF_RETURN_IF_ERROR(Workspace(
        ctx, kernels::cuda::backward_workspace_bytes(p.shape, p.dtype), &ws,
        &p.workspace));
    return ToStatus(kernels::cuda::backward(p, StreamOf(ctx)));
  }
  static absl::Status Moments(OpKernelContext* ctx, kernels::MomentsParams p) {
    TF_RETURN_IF_ERROR(DriverStatus());
    Tensor ws;
    TF_RETURN_IF_ERROR(Workspace(
        ctx, kernels::cuda::moments_workspace_bytes(p.shape, p.dtype), &ws,
        &p.workspace));
    return ToStatus(kernels::cuda::moments(p, StreamOf(ctx)));
  }
  static absl::Status Normalize(OpKernelContext* ctx,
                                kernels::NormalizeParams p) {
    TF_RETURN_IF_ERROR(DriverStatus());
    Tensor ws;
    TF_RETURN_IF_ERROR(Workspace(
        ctx, kernels::cuda::normalize_workspace_bytes(p.shape, p.dtype), &ws,
        &p.workspace));
    return ToStatus(kernels::cuda::normalize(p, StreamOf(ctx)));
  }
  static absl::Status Update(OpKernelContext* ctx, kernels::UpdateParams p) {
    TF_RETURN_IF_ERROR(DriverStatus());
    return ToStatus(kernels::cuda::update_moving_stats(p, StreamOf(ctx)));
  }
  static absl::Status Copy(OpKernelContext* ctx, void* dst, const void* src,
                           size_t bytes) {
    const cudaError_t e = cudaMemcpyAsync(
        dst, src, bytes, cudaMemcpyDeviceToDevice, StreamOf(ctx));
    if (e != cudaSuccess) {
      return errors::Internal("fused_bn: device copy failed: ",
                              cudaGetErrorString(e));
    }
    return absl::OkStatus();
  }
};

FUSED_BN_REGISTER_TU(DEVICE_GPU, GPUDevice, Eigen::half, float);
FUSED_BN_REGISTER_TU(DEVICE_GPU, GPUDevice, bfloat16, float);
FUSED_BN_REGISTER_TU(DEVICE_GPU, GPUDevice, float, float);
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_GPU, GPUDevice, Eigen::half, float);
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_GPU, GPUDevice, bfloat16, float);
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_GPU, GPUDevice, float, float);
FUSED_BN_REGISTER_U(DEVICE_GPU, GPUDevice, float);

}  // namespace fused_bn_tf
}  // namespace tensorflow
