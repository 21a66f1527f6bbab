// CUDA launchers for the contracts in bn.h. Every launcher enqueues its work
// on `stream`, never synchronizes, and returns the launch error (if any).
// Pointers are device pointers, num_updates included. Workspaces are scratch
// buffers of at least the returned size, 256-byte aligned.
#pragma once

#include "bn.h"

typedef struct CUstream_st* cudaStream_t;

namespace fused_bn {
namespace cuda {

size_t moments_workspace_bytes(const Shape& shape, DType dtype);
size_t normalize_workspace_bytes(const Shape& shape, DType dtype);
size_t forward_workspace_bytes(const Shape& shape, DType dtype);
size_t backward_workspace_bytes(const Shape& shape, DType dtype);

Status moments(const MomentsParams& p, cudaStream_t stream);
Status normalize(const NormalizeParams& p, cudaStream_t stream);
Status update_moving_stats(const UpdateParams& p, cudaStream_t stream);
Status forward(const ForwardParams& p, cudaStream_t stream);
Status backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_bn
