// Framework-free batch-norm kernels: the contract every launcher fulfils.
//
// x is viewed as [outer, channels, inner]. Channels-last tensors (NHWC,
// NDHWC, [N, C]) have inner == 1; channels-first tensors (NCHW, NCDHW) have
// outer == N and inner == the spatial size. Statistics are per channel, over
// count() = outer * inner values. All sizes and indices are 64-bit.
//
// Element type T is given at run time by DType. Statistics, scale and offset
// have type U: double when T is float64, float otherwise; their pointers are
// void* and must point to U. Half types are accumulated in float32.
//
// Every reduction splits its work into blocks whose bounds depend only on the
// shape (CUDA: and on the device's SM count and occupancy, which size the
// grids), and merges block partials (Chan's parallel Welford) in a fixed
// order: results are bitwise identical run to run and for any thread count.
// With channels == 0 every launcher does nothing (the counter included).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace fused_bn {

enum class DType { kFloat16, kBFloat16, kFloat32, kFloat64 };

struct Shape {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 1;
  int64_t count() const { return outer * inner; }
  int64_t size() const { return outer * channels * inner; }
};

// Empty message means success.
struct Status {
  std::string message;
  bool ok() const { return message.empty(); }
  static Status Ok() { return Status(); }
  static Status Error(std::string m) { return Status{std::move(m)}; }
};

// Batch statistics: biased mean and variance per channel, type U.
struct MomentsParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  const void* x = nullptr;
  void* mean = nullptr;
  void* var = nullptr;
  void* workspace = nullptr;  // CUDA only: moments_workspace_bytes()
};

// y = x * a + b with a = scale * rsqrt(var + epsilon), b = offset - mean * a.
// scale == nullptr means 1, offset == nullptr means 0.
// The epilogue: side_input (x's dtype and layout) is added and relu applied
// in the accumulation type before y is rounded once:
//   y = relu((x - mean) * a + offset + side_input).
// relu(v) is 0 for v < 0 and v otherwise (NaN stays NaN).
struct NormalizeParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  const void* x = nullptr;
  void* y = nullptr;
  const void* mean = nullptr;
  const void* var = nullptr;
  const void* scale = nullptr;
  const void* offset = nullptr;
  double epsilon = 1e-3;
  const void* side_input = nullptr;  // nullptr: none
  bool relu = false;
  void* workspace = nullptr;  // CUDA only: normalize_workspace_bytes()
};

// In-place moving-average update of [channels] statistics of type U:
//   moving = moving * m + batch * (1 - m),
// where m = momentum, or min(momentum, t / (t + 1)) with t = *num_updates
// when num_updates is given (then *num_updates is incremented). The moving
// variance receives var * count / (count - 1) when unbiased_variance.
struct UpdateParams {
  DType dtype = DType::kFloat32;  // selects U only
  int64_t channels = 0;
  const void* mean = nullptr;
  const void* var = nullptr;
  int64_t count = 0;
  void* moving_mean = nullptr;
  void* moving_var = nullptr;
  int64_t* num_updates = nullptr;
  double momentum = 0.99;
  bool unbiased_variance = true;
};

// The whole forward of batch_norm(x, training).
//   training: batch moments, y normalized with them, moving statistics (if
//     given) updated in place as UpdateParams says.
//   inference: y normalized with moving_mean / moving_var (required).
// Always writes saved_mean and saved_inv_std = rsqrt(var + epsilon) [C, U],
// the statistics y was normalized with: what the backward needs.
// side_input and relu are NormalizeParams' epilogue; they change y only.
struct ForwardParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  const void* x = nullptr;
  void* y = nullptr;
  const void* scale = nullptr;
  const void* offset = nullptr;
  double epsilon = 1e-3;
  bool training = true;
  void* moving_mean = nullptr;
  void* moving_var = nullptr;
  int64_t* num_updates = nullptr;
  double momentum = 0.99;
  bool unbiased_variance = true;
  void* saved_mean = nullptr;
  void* saved_inv_std = nullptr;
  void* workspace = nullptr;  // CUDA only: forward_workspace_bytes()
  const void* side_input = nullptr;  // nullptr: none
  bool relu = false;
};

// Backward of ForwardParams given dy. With x_hat = (x - saved_mean) * inv_std:
//   doffset = sum(dy), dscale = sum(dy * x_hat)                 [C, U]
//   training: dx = scale * inv_std * (dy - doffset / m - x_hat * dscale / m)
//   frozen:   dx = scale * inv_std * dy
// dx has x's dtype; dx may be nullptr (only dscale/doffset wanted).
// Epilogue (relu): the forward's y is given and dy is replaced by
// g = y > 0 ? dy : 0 everywhere above. dside (x's dtype), when given,
// receives g: the gradient of side_input (dy itself without relu).
// The reduction pass reads dy, y and x and writes g (to dside, else to dx's
// buffer); the dx pass reads g and x: 7 passes over x's size, against 8 for
// masking dy in both passes and writing dx and dside in the second. On the
// 2-core CPU the relu-only variant of the latter (mask in both passes, no g)
// measured no faster, and g's non-temporal stores (when the output is not
// in place) were worth 10-25% of the backward.
// Given sums (sum_dy and sum_dy_xhat, both or neither; training only): the
// reduction is skipped and dx uses them in place of doffset and dscale, with
// m = count: the dx of a batch norm whose statistics span more values than x
// (sync BN: the sums and count of the global batch). dscale and doffset are
// not written then.
struct BackwardParams {
  DType dtype = DType::kFloat32;
  Shape shape;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* scale = nullptr;
  const void* saved_mean = nullptr;
  const void* saved_inv_std = nullptr;
  bool training = true;
  void* dx = nullptr;
  void* dscale = nullptr;
  void* doffset = nullptr;
  const void* sum_dy = nullptr;       // [C, U] given sums, with sum_dy_xhat
  const void* sum_dy_xhat = nullptr;  // [C, U]
  int64_t count = 0;                  // values per channel the sums span
  void* workspace = nullptr;  // CUDA only: backward_workspace_bytes()
  const void* y = nullptr;  // relu: the forward's output
  bool relu = false;
  void* dside = nullptr;    // nullptr: not wanted
};

// BackwardParams' given-sums mode is complete and consistent.
inline Status check_given_sums(const BackwardParams& p) {
  if ((p.sum_dy == nullptr) != (p.sum_dy_xhat == nullptr)) {
    return Status::Error("backward: give both sum_dy and sum_dy_xhat or neither");
  }
  if (p.sum_dy && !p.training) {
    return Status::Error("backward: given sums need training");
  }
  if (p.sum_dy && (p.relu || p.dside)) {
    return Status::Error(
        "backward: given sums take dy already masked by the epilogue (no "
        "relu, no dside)");
  }
  if (p.sum_dy && p.count < 1) {
    return Status::Error("backward: count must be >= 1 with given sums, got " +
                         std::to_string(p.count));
  }
  return Status::Ok();
}

inline size_t stat_bytes(DType t) {
  return t == DType::kFloat64 ? sizeof(double) : sizeof(float);
}
inline size_t element_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}

namespace cpu {

// Runs fn(begin, end) over disjoint ranges covering [0, n), possibly
// concurrently. cost_per_item, a hint for how many threads the work is
// worth, is the bytes of x an item covers (for the merges: of the partials);
// it is the same for every pass over x of an op, so its passes split alike.
using ParallelFor = std::function<void(
    int64_t n, int64_t cost_per_item,
    const std::function<void(int64_t, int64_t)>& fn)>;

// A ParallelFor that runs everything on the calling thread.
ParallelFor Serial();

// The instruction set of the kernels in use: "avx512" or "avx2".
const char* isa();

Status moments(const MomentsParams& p, const ParallelFor& pf);
Status normalize(const NormalizeParams& p, const ParallelFor& pf);
Status update_moving_stats(const UpdateParams& p);
Status forward(const ForwardParams& p, const ParallelFor& pf);
Status backward(const BackwardParams& p, const ParallelFor& pf);

}  // namespace cpu
}  // namespace fused_bn
