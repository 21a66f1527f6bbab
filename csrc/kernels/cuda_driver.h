// Whether the NVIDIA driver can run the CUDA kernels: a pure function of the
// versions cudaDriverGetVersion() and CUDART_VERSION give (1000 * major +
// 10 * minor), so the message is testable without a GPU or a driver.
//
// The CUDA runtime is linked statically. NVIDIA's minor-version compatibility
// lets code built with any CUDA 13.x toolkit run on any driver of CUDA 13.0
// or newer (R580+), and likewise 12.x on R525+; a driver of an older major
// version fails every launch with cudaErrorInsufficientDriver.
#pragma once

#include <string>

#include "bn.h"

namespace fused_bn {
namespace cuda {

inline std::string cuda_version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

// Ok, or the error users see before the first launch on an older driver.
inline Status driver_check(int driver_version, int runtime_version) {
  const int major = runtime_version / 1000;
  if (driver_version >= major * 1000) return Status::Ok();
  std::string need = "an NVIDIA driver that supports CUDA " +
                     std::to_string(major) + ".0 or newer";
  if (major == 13) need += " (Linux driver R580, 580.65.06, or newer)";
  if (major == 12) need += " (Linux driver R525, 525.60.13, or newer)";
  const std::string have =
      driver_version <= 0
          ? "no NVIDIA driver was found"
          : "this machine's driver supports CUDA " +
                cuda_version_string(driver_version) + " at most";
  return Status::Error(
      "fused_bn's CUDA kernels were built with CUDA " +
      cuda_version_string(runtime_version) + " and need " + need + "; " +
      have + ". Update the NVIDIA driver, or run fused_bn on the CPU "
      "(e.g. under tf.device(\"/CPU:0\")).");
}

}  // namespace cuda
}  // namespace fused_bn
