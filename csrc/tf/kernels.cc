// CPU backend and registrations. Kernels run on TensorFlow's intra-op pool.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>

#include "kernels.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace fused_bn_tf {

using CPUDevice = Eigen::ThreadPoolDevice;

namespace {
// ParallelFor costs are bytes of x (bn.h). A chunk is the unit the threads
// claim; a thread is woken only for at least kBytesPerThread of the op's x.
// Below that, waking it and moving the data to its core's cache costs more
// than it saves: on the 2-core VM of benchmarks/results a pass over 1 MB of
// float32 ran faster on one thread (about 250 us a call against 280 us
// split in two), a pass over 2 MB faster on two.
constexpr int64_t kChunkBytes = int64_t(256) << 10;
constexpr int64_t kBytesPerThread = int64_t(1) << 20;

// Chunks of one ParallelFor, claimed one at a time by the calling thread and
// by the pool threads it woke. The state is shared so that a pool thread that
// starts late, after the caller has returned, finds nothing left and never
// touches fn: fn runs only for a claimed chunk, and the caller returns only
// when every chunk has finished.
struct Chunks {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, grain, count;
  std::atomic<int64_t> next{0}, done{0};

  // Runs chunks until none is left.
  void Drain() {
    int64_t ran = 0;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;
         ++ran) {
      const int64_t b = i * grain;
      (*fn)(b, std::min(n, b + grain));
    }
    if (ran > 0) done.fetch_add(ran, std::memory_order_release);
  }
};

// Runs fn over [0, n) on the intra-op pool, with the calling thread taking
// part. Eigen's ParallelFor hands fixed blocks to pool threads and then
// sleeps on a barrier, so each call pays a thread wake-up and a caller
// wake-up before the last block is done; on a virtual machine each costs
// tens of microseconds, as much as a pass over a megabyte. Here the caller
// starts at once and keeps claiming chunks, the woken threads join when they
// arrive, and the caller spins (yielding) for the last chunk in flight
// instead of sleeping. Work too small to split runs inline and wakes nobody.
// Which thread runs a chunk never changes a result: the kernels' blocks and
// merge order depend only on the shape.
void RunChunks(thread::ThreadPool* pool, int64_t n, int64_t cost,
               const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t grain =
      std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(cost, 1));
  const int64_t count = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(
      {count, pool->NumThreads(), n * cost / kBytesPerThread}) - 1;
  if (helpers <= 0) {
    fn(0, n);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->fn = &fn;
  chunks->n = n;
  chunks->grain = grain;
  chunks->count = count;
  for (int64_t h = 0; h < helpers; ++h) {
    pool->Schedule([chunks] { chunks->Drain(); });
  }
  chunks->Drain();
  while (chunks->done.load(std::memory_order_acquire) < count) {
    std::this_thread::yield();
  }
}

kernels::cpu::ParallelFor PoolOf(OpKernelContext* ctx) {
  thread::ThreadPool* pool =
      ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost,
                const std::function<void(int64_t, int64_t)>& fn) {
    RunChunks(pool, n, cost, fn);
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
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_CPU, CPUDevice, Eigen::half, float);
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_CPU, CPUDevice, bfloat16, float);
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_CPU, CPUDevice, float, float);
FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE_CPU, CPUDevice, double, double);
FUSED_BN_REGISTER_U(DEVICE_CPU, CPUDevice, float);
FUSED_BN_REGISTER_U(DEVICE_CPU, CPUDevice, double);

}  // namespace fused_bn_tf
}  // namespace tensorflow
