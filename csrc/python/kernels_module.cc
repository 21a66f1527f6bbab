// pybind11 binding of the framework-free kernels (csrc/kernels) over raw
// pointers: buffers are passed as integer addresses (numpy `ctypes.data`,
// torch `data_ptr()`, CuPy `data.ptr`), shapes as [outer, channels, inner].
// device="cpu" runs the CPU kernels on `threads` std::threads; device="cuda"
// enqueues the CUDA launchers on `stream` (a cudaStream_t as int, 0 = the
// legacy default stream) and does not synchronize.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "bn.h"
#include "cuda_driver.h"
#ifdef FUSED_BN_WITH_CUDA
#include "bn_cuda.h"
#endif
#ifdef FUSED_BN_CUDA_EMU
#include <pybind11/numpy.h>

#include "emu_host.h"
#endif

namespace py = pybind11;

namespace fused_bn {
namespace {

DType parse_dtype(const std::string& s) {
  if (s == "float16") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  if (s == "float32") return DType::kFloat32;
  if (s == "float64") return DType::kFloat64;
  throw py::value_error("dtype must be one of float16, bfloat16, float32, "
                        "float64; got '" + s + "'");
}

Shape make_shape(int64_t outer, int64_t channels, int64_t inner) {
  if (outer < 0 || channels < 0 || inner < 1) {
    throw py::value_error("bad shape: need outer >= 0, channels >= 0, "
                          "inner >= 1; got [" + std::to_string(outer) + ", " +
                          std::to_string(channels) + ", " +
                          std::to_string(inner) + "]");
  }
  return Shape{outer, channels, inner};
}

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void require(uintptr_t p, const char* name) {
  if (p == 0) throw py::value_error(std::string(name) + " must not be 0");
}

// Splits [0, n) into at most `threads` contiguous ranges, one thread each.
cpu::ParallelFor thread_pool(int threads) {
  if (threads <= 1) return cpu::Serial();
  return [threads](int64_t n, int64_t,
                   const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    const int64_t k = std::min<int64_t>(threads, n);
    std::vector<std::thread> pool;
    for (int64_t i = 1; i < k; ++i) {
      pool.emplace_back(fn, n * i / k, n * (i + 1) / k);
    }
    fn(0, n / k);
    for (auto& t : pool) t.join();
  };
}

enum class Device { kCpu, kCuda };

Device parse_device(const std::string& d) {
  if (d == "cpu") return Device::kCpu;
  if (d == "cuda" || d == "gpu") {
#ifdef FUSED_BN_WITH_CUDA
    return Device::kCuda;
#else
    throw py::value_error("this build of fused_bn._kernels has no CUDA");
#endif
  }
  throw py::value_error("device must be 'cpu' or 'cuda'; got '" + d + "'");
}

void check(const Status& s) {
  if (!s.ok()) throw std::runtime_error(s.message);
}

#ifdef FUSED_BN_WITH_CUDA
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
#endif

// Runs cpu_fn() or cuda_fn() without the GIL and raises on a bad Status.
template <typename C, typename G>
void run(Device d, C&& cpu_fn, G&& cuda_fn) {
  Status s;
  {
    py::gil_scoped_release nogil;
    if (d == Device::kCpu) {
      s = cpu_fn();
    } else {
      s = cuda_fn();
    }
  }
  check(s);
}

#ifndef FUSED_BN_WITH_CUDA
Status no_cuda() { return Status::Error("no CUDA in this build"); }
#endif

}  // namespace
}  // namespace fused_bn

PYBIND11_MODULE(_kernels, m) {
  using namespace fused_bn;
  m.doc() =
      "Framework-free fused_bn kernels over raw pointers (see csrc/kernels/"
      "bn.h). Shapes are [outer, channels, inner]: inner == 1 is "
      "channels-last, inner > 1 channels-first. Statistics are float32 "
      "(float64 for float64 x). CUDA calls are asynchronous on `stream`.";

  m.def("has_cuda", [] {
#ifdef FUSED_BN_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build has the CUDA kernels.");

  // The CPU emulator of the CUDA kernels (csrc/emu): "device" memory is host
  // memory, handed to Python as a NumPy array that owns it.
  m.def("cuda_emulated", [] {
#ifdef FUSED_BN_CUDA_EMU
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels run on the CPU emulator (csrc/emu).");
#ifdef FUSED_BN_CUDA_EMU
  m.def(
      "emu_device_alloc",
      [](size_t nbytes) {
        void* p = fused_bn_emu::device_malloc(nbytes);
        if (!p) throw std::bad_alloc();
        py::capsule owner(p, [](void* q) { fused_bn_emu::device_free(q); });
        return py::array_t<uint8_t>({nbytes}, {1}, static_cast<uint8_t*>(p),
                                    owner);
      },
      py::arg("nbytes"),
      "Emulated device memory: a uint8 array of exactly nbytes, 256-byte "
      "aligned (cudaMalloc), freed with the last view of it.");
#endif

  m.def("cpu_isa", [] { return std::string(cpu::isa()); },
        "The CPU kernels in use: \"avx512\" or \"avx2\".");

  const char* ws_doc =
      "Bytes of device workspace the CUDA launcher needs (0 without CUDA).";
  auto ws = [](size_t (*fn)(const Shape&, DType)) {
    return [fn](const std::string& dtype, int64_t outer, int64_t channels,
                int64_t inner) -> size_t {
      const Shape s = make_shape(outer, channels, inner);
      const DType t = parse_dtype(dtype);
      return fn ? fn(s, t) : 0;
    };
  };
#ifdef FUSED_BN_WITH_CUDA
  auto moments_ws = &cuda::moments_workspace_bytes;
  auto normalize_ws = &cuda::normalize_workspace_bytes;
  auto forward_ws = &cuda::forward_workspace_bytes;
  auto backward_ws = &cuda::backward_workspace_bytes;
#else
  size_t (*moments_ws)(const Shape&, DType) = nullptr;
  auto normalize_ws = moments_ws, forward_ws = moments_ws,
       backward_ws = moments_ws;
#endif
  m.def("moments_workspace_bytes", ws(moments_ws), py::arg("dtype"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), ws_doc);
  m.def("normalize_workspace_bytes", ws(normalize_ws), py::arg("dtype"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), ws_doc);
  m.def("forward_workspace_bytes", ws(forward_ws), py::arg("dtype"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), ws_doc);
  m.def("backward_workspace_bytes", ws(backward_ws), py::arg("dtype"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), ws_doc);

  m.def(
      "moments",
      [](const std::string& dtype, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t x, uintptr_t mean, uintptr_t var,
         const std::string& device, uintptr_t stream, uintptr_t workspace,
         int threads) {
        MomentsParams p;
        p.dtype = parse_dtype(dtype);
        p.shape = make_shape(outer, channels, inner);
        require(x, "x");
        require(mean, "mean");
        require(var, "var");
        p.x = ptr(x);
        p.mean = ptr(mean);
        p.var = ptr(var);
        p.workspace = ptr(workspace);
        const Device d = parse_device(device);
        (void)stream;
        run(
            d, [&] { return cpu::moments(p, thread_pool(threads)); },
            [&] {
#ifdef FUSED_BN_WITH_CUDA
              return cuda::moments(p, as_stream(stream));
#else
              return no_cuda();
#endif
            });
      },
      py::arg("dtype"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("x"), py::arg("mean"), py::arg("var"),
      py::arg("device") = "cpu", py::arg("stream") = 0,
      py::arg("workspace") = 0, py::arg("threads") = 1,
      "Biased batch mean and variance per channel into mean, var [C].");

  m.def(
      "normalize",
      [](const std::string& dtype, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t x, uintptr_t y, uintptr_t mean,
         uintptr_t var, uintptr_t scale, uintptr_t offset, double epsilon,
         const std::string& device, uintptr_t stream, int threads,
         uintptr_t side_input, bool relu, uintptr_t workspace) {
        NormalizeParams p;
        p.dtype = parse_dtype(dtype);
        p.shape = make_shape(outer, channels, inner);
        require(x, "x");
        require(y, "y");
        require(mean, "mean");
        require(var, "var");
        if (!(epsilon > 0)) throw py::value_error("epsilon must be > 0");
        p.x = ptr(x);
        p.y = ptr(y);
        p.mean = ptr(mean);
        p.var = ptr(var);
        p.scale = ptr(scale);
        p.offset = ptr(offset);
        p.epsilon = epsilon;
        p.side_input = ptr(side_input);
        p.relu = relu;
        p.workspace = ptr(workspace);
        const Device d = parse_device(device);
        (void)stream;
        run(
            d, [&] { return cpu::normalize(p, thread_pool(threads)); },
            [&] {
#ifdef FUSED_BN_WITH_CUDA
              return cuda::normalize(p, as_stream(stream));
#else
              return no_cuda();
#endif
            });
      },
      py::arg("dtype"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("x"), py::arg("y"), py::arg("mean"),
      py::arg("var"), py::arg("scale") = 0, py::arg("offset") = 0,
      py::arg("epsilon") = 1e-3, py::arg("device") = "cpu",
      py::arg("stream") = 0, py::arg("threads") = 1,
      py::arg("side_input") = 0, py::arg("relu") = false,
      py::arg("workspace") = 0,
      "y = (x - mean) * scale * rsqrt(var + epsilon) + offset; scale/offset "
      "0 mean 1 and 0. Epilogue: y = relu(... + side_input) (side_input 0: "
      "none; relu: max(., 0)), rounded once.");

  m.def(
      "update_moving_stats",
      [](const std::string& dtype, int64_t channels, uintptr_t mean,
         uintptr_t var, int64_t count, uintptr_t moving_mean,
         uintptr_t moving_var, uintptr_t num_updates, double momentum,
         bool unbiased_variance, const std::string& device,
         uintptr_t stream) {
        UpdateParams p;
        p.dtype = parse_dtype(dtype);
        if (channels < 0) throw py::value_error("channels must be >= 0");
        if (!(momentum >= 0 && momentum <= 1)) {
          throw py::value_error("momentum must be in [0, 1]");
        }
        require(mean, "mean");
        require(var, "var");
        require(moving_mean, "moving_mean");
        require(moving_var, "moving_var");
        p.channels = channels;
        p.mean = ptr(mean);
        p.var = ptr(var);
        p.count = count;
        p.moving_mean = ptr(moving_mean);
        p.moving_var = ptr(moving_var);
        p.num_updates = reinterpret_cast<int64_t*>(num_updates);
        p.momentum = momentum;
        p.unbiased_variance = unbiased_variance;
        const Device d = parse_device(device);
        (void)stream;
        run(
            d, [&] { return cpu::update_moving_stats(p); },
            [&] {
#ifdef FUSED_BN_WITH_CUDA
              return cuda::update_moving_stats(p, as_stream(stream));
#else
              return no_cuda();
#endif
            });
      },
      py::arg("dtype"), py::arg("channels"), py::arg("mean"), py::arg("var"),
      py::arg("count"), py::arg("moving_mean"), py::arg("moving_var"),
      py::arg("num_updates") = 0, py::arg("momentum") = 0.99,
      py::arg("unbiased_variance") = true, py::arg("device") = "cpu",
      py::arg("stream") = 0,
      "In-place moving-average update (warm-up when num_updates != 0; it "
      "points to an int64 counter, incremented).");

  m.def(
      "forward",
      [](const std::string& dtype, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t x, uintptr_t y, uintptr_t saved_mean,
         uintptr_t saved_inv_std, uintptr_t scale, uintptr_t offset,
         double epsilon, bool training, uintptr_t moving_mean,
         uintptr_t moving_var, uintptr_t num_updates, double momentum,
         bool unbiased_variance, const std::string& device, uintptr_t stream,
         uintptr_t workspace, int threads, uintptr_t side_input, bool relu) {
        ForwardParams p;
        p.dtype = parse_dtype(dtype);
        p.shape = make_shape(outer, channels, inner);
        require(x, "x");
        require(y, "y");
        require(saved_mean, "saved_mean");
        require(saved_inv_std, "saved_inv_std");
        if (!(epsilon > 0)) throw py::value_error("epsilon must be > 0");
        if (!(momentum >= 0 && momentum <= 1)) {
          throw py::value_error("momentum must be in [0, 1]");
        }
        if ((moving_mean == 0) != (moving_var == 0)) {
          throw py::value_error("give both moving_mean and moving_var or "
                                "neither");
        }
        if (!training && moving_mean == 0) {
          throw py::value_error("inference needs moving_mean and moving_var");
        }
        p.x = ptr(x);
        p.y = ptr(y);
        p.saved_mean = ptr(saved_mean);
        p.saved_inv_std = ptr(saved_inv_std);
        p.scale = ptr(scale);
        p.offset = ptr(offset);
        p.epsilon = epsilon;
        p.training = training;
        p.moving_mean = ptr(moving_mean);
        p.moving_var = ptr(moving_var);
        p.num_updates = reinterpret_cast<int64_t*>(num_updates);
        p.momentum = momentum;
        p.unbiased_variance = unbiased_variance;
        p.workspace = ptr(workspace);
        p.side_input = ptr(side_input);
        p.relu = relu;
        const Device d = parse_device(device);
        (void)stream;
        run(
            d, [&] { return cpu::forward(p, thread_pool(threads)); },
            [&] {
#ifdef FUSED_BN_WITH_CUDA
              return cuda::forward(p, as_stream(stream));
#else
              return no_cuda();
#endif
            });
      },
      py::arg("dtype"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("x"), py::arg("y"), py::arg("saved_mean"),
      py::arg("saved_inv_std"), py::arg("scale") = 0, py::arg("offset") = 0,
      py::arg("epsilon") = 1e-3, py::arg("training") = true,
      py::arg("moving_mean") = 0, py::arg("moving_var") = 0,
      py::arg("num_updates") = 0, py::arg("momentum") = 0.99,
      py::arg("unbiased_variance") = true, py::arg("device") = "cpu",
      py::arg("stream") = 0, py::arg("workspace") = 0, py::arg("threads") = 1,
      py::arg("side_input") = 0, py::arg("relu") = false,
      "Whole batch-norm forward (training: moments + moving update + "
      "normalize; inference: normalize with the moving statistics). Writes "
      "y, saved_mean and saved_inv_std [C]. Epilogue as in normalize.");

  m.def(
      "backward",
      [](const std::string& dtype, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t dy, uintptr_t x, uintptr_t saved_mean,
         uintptr_t saved_inv_std, uintptr_t scale, bool training,
         uintptr_t dx, uintptr_t dscale, uintptr_t doffset,
         const std::string& device, uintptr_t stream, uintptr_t workspace,
         int threads, uintptr_t y, bool relu, uintptr_t dside) {
        BackwardParams p;
        p.dtype = parse_dtype(dtype);
        p.shape = make_shape(outer, channels, inner);
        require(dy, "dy");
        require(x, "x");
        require(saved_mean, "saved_mean");
        require(saved_inv_std, "saved_inv_std");
        p.dy = ptr(dy);
        p.x = ptr(x);
        p.saved_mean = ptr(saved_mean);
        p.saved_inv_std = ptr(saved_inv_std);
        p.scale = ptr(scale);
        p.training = training;
        p.dx = ptr(dx);
        p.dscale = ptr(dscale);
        p.doffset = ptr(doffset);
        p.workspace = ptr(workspace);
        if (relu) require(y, "y (relu)");
        p.y = ptr(y);
        p.relu = relu;
        p.dside = ptr(dside);
        const Device d = parse_device(device);
        (void)stream;
        run(
            d, [&] { return cpu::backward(p, thread_pool(threads)); },
            [&] {
#ifdef FUSED_BN_WITH_CUDA
              return cuda::backward(p, as_stream(stream));
#else
              return no_cuda();
#endif
            });
      },
      py::arg("dtype"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("dy"), py::arg("x"), py::arg("saved_mean"),
      py::arg("saved_inv_std"), py::arg("scale") = 0,
      py::arg("training") = true, py::arg("dx") = 0, py::arg("dscale") = 0,
      py::arg("doffset") = 0, py::arg("device") = "cpu",
      py::arg("stream") = 0, py::arg("workspace") = 0, py::arg("threads") = 1,
      py::arg("y") = 0, py::arg("relu") = false, py::arg("dside") = 0,
      "Backward of forward(): dx (optional), dscale = sum(dy * x_hat), "
      "doffset = sum(dy). training=False is frozen batch norm. relu: dy is "
      "first masked by the forward's y > 0; dside (optional) receives the "
      "masked dy, the side input's gradient.");

  m.def("cuda_driver_check",
        [](int driver_version, int runtime_version) {
          return cuda::driver_check(driver_version, runtime_version).message;
        },
        py::arg("driver_version"), py::arg("runtime_version"),
        "The error the CUDA ops raise when a driver supporting CUDA "
        "`driver_version` cannot run kernels built with CUDA runtime "
        "`runtime_version` (both 1000 * major + 10 * minor), or \"\".");

  m.def(
      "backward_apply",
      [](const std::string& dtype, int64_t outer, int64_t channels,
         int64_t inner, uintptr_t dy, uintptr_t x, uintptr_t saved_mean,
         uintptr_t saved_inv_std, uintptr_t sum_dy, uintptr_t sum_dy_xhat,
         int64_t count, uintptr_t dx, uintptr_t scale,
         const std::string& device, uintptr_t stream, uintptr_t workspace,
         int threads) {
        BackwardParams p;
        p.dtype = parse_dtype(dtype);
        p.shape = make_shape(outer, channels, inner);
        require(dy, "dy");
        require(x, "x");
        require(saved_mean, "saved_mean");
        require(saved_inv_std, "saved_inv_std");
        require(sum_dy, "sum_dy");
        require(sum_dy_xhat, "sum_dy_xhat");
        require(dx, "dx");
        if (count < 1) throw py::value_error("count must be >= 1");
        p.dy = ptr(dy);
        p.x = ptr(x);
        p.saved_mean = ptr(saved_mean);
        p.saved_inv_std = ptr(saved_inv_std);
        p.scale = ptr(scale);
        p.sum_dy = ptr(sum_dy);
        p.sum_dy_xhat = ptr(sum_dy_xhat);
        p.count = count;
        p.dx = ptr(dx);
        p.workspace = ptr(workspace);
        const Device d = parse_device(device);
        (void)stream;
        run(
            d, [&] { return cpu::backward(p, thread_pool(threads)); },
            [&] {
#ifdef FUSED_BN_WITH_CUDA
              return cuda::backward(p, as_stream(stream));
#else
              return no_cuda();
#endif
            });
      },
      py::arg("dtype"), py::arg("outer"), py::arg("channels"),
      py::arg("inner"), py::arg("dy"), py::arg("x"), py::arg("saved_mean"),
      py::arg("saved_inv_std"), py::arg("sum_dy"), py::arg("sum_dy_xhat"),
      py::arg("count"), py::arg("dx"), py::arg("scale") = 0,
      py::arg("device") = "cpu", py::arg("stream") = 0,
      py::arg("workspace") = 0, py::arg("threads") = 1,
      "Training dx of backward() from given sums over `count` values per "
      "channel (sync BN: the all-reduced sum(dy), sum(dy * x_hat) and the "
      "global count); no reduction. backward(dx=0) gives the local sums.");
}
