// OpKernels for the FusedBn> ops, templated on the device. Each kernel
// validates its inputs (naming the argument), allocates outputs and calls
// Backend<Device>, the only device-specific part (kernels.cc: CPU,
// kernels_gpu.cc: GPU). Variables are read and written in place under their
// mutexes; nothing is changed unless every check passed. Elementwise outputs
// (y, dx, dside) reuse the buffer of x, side_input or dy when nothing else
// holds it: every kernel writes element i only after reading element i of
// that input.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "bn.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"

namespace tensorflow {
namespace fused_bn_tf {

namespace kernels = ::fused_bn;

// Device-specific calls. Each returns the launcher's status as a TF status.
//   static absl::Status Forward(OpKernelContext*, kernels::ForwardParams);
//   static absl::Status Backward(OpKernelContext*, kernels::BackwardParams);
//   static absl::Status Moments(OpKernelContext*, kernels::MomentsParams);
//   static absl::Status Normalize(OpKernelContext*, kernels::NormalizeParams);
//   static absl::Status Update(OpKernelContext*, kernels::UpdateParams);
//   static absl::Status Copy(OpKernelContext*, void* dst, const void* src,
//                            size_t bytes);  // device to device
template <typename Device>
struct Backend;

template <typename T>
constexpr kernels::DType DTypeOf();
template <>
constexpr kernels::DType DTypeOf<Eigen::half>() {
  return kernels::DType::kFloat16;
}
template <>
constexpr kernels::DType DTypeOf<bfloat16>() {
  return kernels::DType::kBFloat16;
}
template <>
constexpr kernels::DType DTypeOf<float>() {
  return kernels::DType::kFloat32;
}
template <>
constexpr kernels::DType DTypeOf<double>() {
  return kernels::DType::kFloat64;
}

inline absl::Status ToStatus(const kernels::Status& s) {
  return s.ok() ? absl::OkStatus() : errors::Internal("fused_bn: ", s.message);
}

// Views x as [outer, C, inner] for the layout; checks rank 2 to 5.
inline absl::Status ShapeOf(const Tensor& x, const std::string& format,
                            kernels::Shape* s) {
  const int rank = x.dims();
  if (rank < 2 || rank > 5) {
    return errors::InvalidArgument("x must have rank 2 to 5, got shape ",
                                   x.shape().DebugString());
  }
  const int ch = format == "channels_last" ? rank - 1 : 1;
  s->outer = 1;
  s->inner = 1;
  for (int i = 0; i < ch; ++i) s->outer *= x.dim_size(i);
  s->channels = x.dim_size(ch);
  for (int i = ch + 1; i < rank; ++i) s->inner *= x.dim_size(i);
  return absl::OkStatus();
}

inline absl::Status CheckVector(const Tensor& t, const char* name, int64_t c) {
  if (t.dims() != 1 || t.dim_size(0) != c) {
    return errors::InvalidArgument(name, " must have shape [", c,
                                   "] (x's channel count), got ",
                                   t.shape().DebugString());
  }
  return absl::OkStatus();
}

inline absl::Status ReadTraining(OpKernelContext* ctx, int index,
                                 bool* training) {
  const Tensor& t = ctx->input(index);
  if (t.dtype() != DT_BOOL || t.dims() != 0) {
    return errors::InvalidArgument("training must be a scalar bool, got ",
                                   DataTypeString(t.dtype()), " of shape ",
                                   t.shape().DebugString());
  }
  *training = t.scalar<bool>()();
  return absl::OkStatus();
}

inline absl::Status CheckAttrs(float epsilon, float momentum) {
  if (!(epsilon > 0.f) || !std::isfinite(epsilon)) {
    return errors::InvalidArgument("epsilon must be a finite value > 0, got ",
                                   epsilon);
  }
  if (!(momentum >= 0.f && momentum <= 1.f)) {
    return errors::InvalidArgument("momentum must be in [0, 1], got ",
                                   momentum);
  }
  return absl::OkStatus();
}

// The epilogue's optional side input: the list input "side_input" (at most
// one tensor, x's shape). *side is nullptr when it is absent; *index is its
// input index.
inline absl::Status SideInput(OpKernelContext* ctx, const Tensor& x,
                              const Tensor** side, int* index) {
  *side = nullptr;
  OpInputList list;
  int start, stop;
  TF_RETURN_IF_ERROR(ctx->input_list("side_input", &list));
  TF_RETURN_IF_ERROR(ctx->op_kernel().InputRange("side_input", &start, &stop));
  if (list.size() > 1) {
    return errors::InvalidArgument("side_input takes at most one tensor, got ",
                                   list.size());
  }
  if (list.size() == 1) {
    if (list[0].shape() != x.shape()) {
      return errors::InvalidArgument("side_input must have x's shape ",
                                     x.shape().DebugString(), ", got ",
                                     list[0].shape().DebugString());
    }
    *side = &list[0];
    *index = start;
  }
  return absl::OkStatus();
}

// The "activation" attr: true for 'relu'.
inline absl::Status ReluAttr(OpKernelConstruction* ctx, bool* relu) {
  std::string activation;
  TF_RETURN_IF_ERROR(ctx->GetAttr("activation", &activation));
  if (activation != "none" && activation != "relu") {
    return errors::InvalidArgument(
        "activation must be 'none' or 'relu', got '", activation, "'");
  }
  *relu = activation == "relu";
  return absl::OkStatus();
}

// A looked-up resource variable with the checks every caller needs.
inline absl::Status LookupVar(OpKernelContext* ctx, const Tensor& handle,
                              const char* name, DataType dtype,
                              const TensorShape& shape,
                              core::RefCountPtr<Var>* var) {
  absl::Status s = LookupResource(ctx, handle.flat<ResourceHandle>()(0), var);
  if (!s.ok()) {
    return errors::InvalidArgument(name, " must be a resource variable: ",
                                   s.message());
  }
  tf_shared_lock l(*(*var)->mu());
  const Tensor* t = (*var)->tensor();
  if (!(*var)->is_initialized) {
    return errors::FailedPrecondition(name, " is not initialized");
  }
  if (t->dtype() != dtype || t->shape() != shape) {
    return errors::InvalidArgument(
        name, " must be a variable of dtype ", DataTypeString(dtype), " and shape ",
        shape.DebugString(), ", got ", DataTypeString(t->dtype()), " ",
        t->shape().DebugString());
  }
  return absl::OkStatus();
}

// Locks distinct variables in address order (exclusive or shared).
class VarLocks {
 public:
  VarLocks(std::vector<Var*> vars, bool exclusive) : exclusive_(exclusive) {
    std::sort(vars.begin(), vars.end());
    vars.erase(std::unique(vars.begin(), vars.end()), vars.end());
    for (Var* v : vars) {
      if (exclusive_) {
        v->mu()->lock();
      } else {
        v->mu()->lock_shared();
      }
      vars_.push_back(v);
    }
  }
  ~VarLocks() {
    for (auto it = vars_.rbegin(); it != vars_.rend(); ++it) {
      if (exclusive_) {
        (*it)->mu()->unlock();
      } else {
        (*it)->mu()->unlock_shared();
      }
    }
  }
  VarLocks(const VarLocks&) = delete;
  VarLocks& operator=(const VarLocks&) = delete;

 private:
  bool exclusive_;
  std::vector<Var*> vars_;
};

// Before an in-place write: if another tensor (e.g. a value read earlier and
// still alive) shares the variable's buffer, give the variable a private
// copy so that value does not change under its reader. Needs var locked.
template <typename Device>
absl::Status PrepareToUpdate(OpKernelContext* ctx, Var* var) {
  Tensor* t = var->tensor();
  if (t->RefCountIsOne()) return absl::OkStatus();
  Tensor copy;
  AllocatorAttributes attr;
  attr.set_gpu_compatible(true);
  TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &copy, attr));
  TF_RETURN_IF_ERROR(Backend<Device>::Copy(ctx, copy.data(), t->data(),
                                           t->TotalBytes()));
  *t = copy;
  return absl::OkStatus();
}

// The moving statistics and counter of an op, looked up and checked.
template <typename U>
struct MovingVars {
  core::RefCountPtr<Var> mean, var, counter;

  absl::Status Lookup(OpKernelContext* ctx, const OpInputList& means,
                      const OpInputList& vars, const OpInputList& counters,
                      int64_t c) {
    const DataType u = DataTypeToEnum<U>::value;
    if (means.size() > 0) {
      TF_RETURN_IF_ERROR(LookupVar(ctx, means[0], "moving_mean", u,
                                   TensorShape({c}), &mean));
      TF_RETURN_IF_ERROR(LookupVar(ctx, vars[0], "moving_variance", u,
                                   TensorShape({c}), &var));
    }
    if (counters.size() > 0) {
      TF_RETURN_IF_ERROR(LookupVar(ctx, counters[0], "num_updates", DT_INT64,
                                   TensorShape({}), &counter));
    }
    return absl::OkStatus();
  }
  std::vector<Var*> all() const {
    std::vector<Var*> v;
    for (Var* p : {mean.get(), var.get(), counter.get()}) {
      if (p) v.push_back(p);
    }
    return v;
  }
  template <typename Device>
  absl::Status PrepareAll(OpKernelContext* ctx) {
    for (Var* p : all()) TF_RETURN_IF_ERROR(PrepareToUpdate<Device>(ctx, p));
    return absl::OkStatus();
  }
};

inline absl::Status CheckListSizes(const OpInputList& means,
                                   const OpInputList& vars,
                                   const OpInputList& counters) {
  if (means.size() > 1 || vars.size() != means.size() ||
      counters.size() > means.size()) {
    return errors::InvalidArgument(
        "moving_mean and moving_variance must both be given or both be "
        "omitted; num_updates (at most one) needs them");
  }
  return absl::OkStatus();
}

template <typename Device, typename T, typename U>
class ForwardOp : public OpKernel {
 public:
  explicit ForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("momentum", &momentum_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("unbiased_variance", &unbiased_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format_));
    OP_REQUIRES_OK(ctx, CheckAttrs(epsilon_, momentum_));
    OP_REQUIRES_OK(ctx, ReluAttr(ctx, &relu_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    const Tensor& offset = ctx->input(2);
    kernels::Shape shape;
    OP_REQUIRES_OK(ctx, ShapeOf(x, format_, &shape));
    const int64_t c = shape.channels;
    OP_REQUIRES_OK(ctx, CheckVector(scale, "scale", c));
    OP_REQUIRES_OK(ctx, CheckVector(offset, "offset", c));
    bool training = false;
    OP_REQUIRES_OK(ctx, ReadTraining(ctx, ctx->num_inputs() - 1, &training));
    OpInputList means, vars, counters;
    OP_REQUIRES_OK(ctx, ctx->input_list("moving_mean", &means));
    OP_REQUIRES_OK(ctx, ctx->input_list("moving_variance", &vars));
    OP_REQUIRES_OK(ctx, ctx->input_list("num_updates", &counters));
    OP_REQUIRES_OK(ctx, CheckListSizes(means, vars, counters));
    OP_REQUIRES(ctx, training || means.size() == 1,
                errors::InvalidArgument(
                    "moving_mean and moving_variance are required when "
                    "training is False"));
    OP_REQUIRES(ctx, !training || shape.count() >= 2,
                errors::InvalidArgument(
                    "training needs at least 2 values per channel to compute "
                    "batch statistics, got ", shape.count(), " for x of shape ",
                    x.shape().DebugString()));
    const Tensor* side;
    int side_index = 0;
    OP_REQUIRES_OK(ctx, SideInput(ctx, x, &side, &side_index));
    MovingVars<U> mv;
    OP_REQUIRES_OK(ctx, mv.Lookup(ctx, means, vars, counters, c));

    Tensor *y, *saved_mean, *saved_inv_std;
    OP_REQUIRES_OK(ctx, side ? ctx->forward_input_or_allocate_output(
                                   {0, side_index}, 0, x.shape(), &y)
                             : ctx->forward_input_or_allocate_output(
                                   {0}, 0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &saved_mean));
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(2, TensorShape({c}), &saved_inv_std));
    if (c == 0) return;

    kernels::ForwardParams p;
    p.dtype = DTypeOf<T>();
    p.shape = shape;
    p.x = x.data();
    p.y = y->data();
    p.scale = scale.data();
    p.offset = offset.data();
    p.epsilon = epsilon_;
    p.training = training;
    p.momentum = momentum_;
    p.unbiased_variance = unbiased_;
    p.saved_mean = saved_mean->data();
    p.saved_inv_std = saved_inv_std->data();
    p.side_input = side ? side->data() : nullptr;
    p.relu = relu_;
    // Only the variables this call uses are locked: inference with a counter
    // never touches the counter.
    VarLocks locks(training ? mv.all()
                            : std::vector<Var*>{mv.mean.get(), mv.var.get()},
                   /*exclusive=*/training);
    if (training && mv.mean) {
      OP_REQUIRES_OK(ctx, mv.template PrepareAll<Device>(ctx));
      if (mv.counter) p.num_updates = static_cast<int64_t*>(mv.counter->tensor()->data());
    }
    if (mv.mean) {
      p.moving_mean = mv.mean->tensor()->data();
      p.moving_var = mv.var->tensor()->data();
    }
    OP_REQUIRES_OK(ctx, Backend<Device>::Forward(ctx, p));
  }

 private:
  float epsilon_, momentum_;
  bool unbiased_, relu_;
  std::string format_;
};

template <typename Device, typename T, typename U>
class ForwardGradOp : public OpKernel {
 public:
  explicit ForwardGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    kernels::Shape shape;
    OP_REQUIRES_OK(ctx, ShapeOf(x, format_, &shape));
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                errors::InvalidArgument("dy must have x's shape ",
                                        x.shape().DebugString(), ", got ",
                                        dy.shape().DebugString()));
    const int64_t c = shape.channels;
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(2), "scale", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(3), "saved_mean", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(4), "saved_inv_std", c));
    bool training = false;
    OP_REQUIRES_OK(ctx, ReadTraining(ctx, 5, &training));
    // The epilogue: y given means the forward applied relu.
    OpInputList ys;
    OP_REQUIRES_OK(ctx, ctx->input_list("y", &ys));
    OP_REQUIRES(ctx, ys.size() <= 1,
                errors::InvalidArgument("y takes at most one tensor, got ",
                                        ys.size()));
    OP_REQUIRES(ctx, ys.size() == 0 || ys[0].shape() == x.shape(),
                errors::InvalidArgument("y must have x's shape ",
                                        x.shape().DebugString(), ", got ",
                                        ys[0].shape().DebugString()));
    OpOutputList dsides;
    OP_REQUIRES_OK(ctx, ctx->output_list("dside", &dsides));
    OP_REQUIRES(ctx, dsides.size() <= 1,
                errors::InvalidArgument("num_dside must be 0 or 1, got ",
                                        dsides.size()));
    // dy's buffer, when nothing else holds it, goes to dside (the masked dy
    // is written over dy by the reduction pass) or else to dx.
    Tensor *dx, *dscale, *doffset, *dside = nullptr;
    if (dsides.size() == 1) {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 3, x.shape(), &dside));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    } else {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    }
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({c}), &doffset));
    if (c == 0) return;
    kernels::BackwardParams p;
    p.dtype = DTypeOf<T>();
    p.shape = shape;
    p.dy = dy.data();
    p.x = x.data();
    p.scale = ctx->input(2).data();
    p.saved_mean = ctx->input(3).data();
    p.saved_inv_std = ctx->input(4).data();
    p.training = training;
    p.dx = dx->data();
    p.dscale = dscale->data();
    p.doffset = doffset->data();
    p.relu = ys.size() == 1;
    p.y = p.relu ? ys[0].data() : nullptr;
    p.dside = dside ? dside->data() : nullptr;
    OP_REQUIRES_OK(ctx, Backend<Device>::Backward(ctx, p));
  }

 private:
  std::string format_;
};

template <typename Device, typename T, typename U>
class MomentsOp : public OpKernel {
 public:
  explicit MomentsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    kernels::Shape shape;
    OP_REQUIRES_OK(ctx, ShapeOf(x, format_, &shape));
    const int64_t c = shape.channels;
    OP_REQUIRES(ctx, shape.count() >= 1 || c == 0,
                errors::InvalidArgument(
                    "moments need at least 1 value per channel, x has shape ",
                    x.shape().DebugString()));
    Tensor *mean, *var;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({c}), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &var));
    if (c == 0) return;
    kernels::MomentsParams p;
    p.dtype = DTypeOf<T>();
    p.shape = shape;
    p.x = x.data();
    p.mean = mean->data();
    p.var = var->data();
    OP_REQUIRES_OK(ctx, Backend<Device>::Moments(ctx, p));
  }

 private:
  std::string format_;
};

template <typename Device, typename T, typename U>
class NormalizeOp : public OpKernel {
 public:
  explicit NormalizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES_OK(ctx, CheckAttrs(epsilon_, 0.f));
    OP_REQUIRES_OK(ctx, ReluAttr(ctx, &relu_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    kernels::Shape shape;
    OP_REQUIRES_OK(ctx, ShapeOf(x, format_, &shape));
    const int64_t c = shape.channels;
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(1), "mean", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(2), "variance", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(3), "scale", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(4), "offset", c));
    const Tensor* side;
    int side_index = 0;
    OP_REQUIRES_OK(ctx, SideInput(ctx, x, &side, &side_index));
    Tensor* y;
    OP_REQUIRES_OK(ctx, side ? ctx->forward_input_or_allocate_output(
                                   {0, side_index}, 0, x.shape(), &y)
                             : ctx->forward_input_or_allocate_output(
                                   {0}, 0, x.shape(), &y));
    if (c == 0) return;
    kernels::NormalizeParams p;
    p.dtype = DTypeOf<T>();
    p.shape = shape;
    p.x = x.data();
    p.y = y->data();
    p.mean = ctx->input(1).data();
    p.var = ctx->input(2).data();
    p.scale = ctx->input(3).data();
    p.offset = ctx->input(4).data();
    p.epsilon = epsilon_;
    p.side_input = side ? side->data() : nullptr;
    p.relu = relu_;
    OP_REQUIRES_OK(ctx, Backend<Device>::Normalize(ctx, p));
  }

 private:
  std::string format_;
  float epsilon_;
  bool relu_;
};

template <typename Device, typename U>
class UpdateMovingStatsOp : public OpKernel {
 public:
  explicit UpdateMovingStatsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("momentum", &momentum_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("unbiased_variance", &unbiased_));
    OP_REQUIRES_OK(ctx, CheckAttrs(1.f, momentum_));
  }

  void Compute(OpKernelContext* ctx) override {
    OpInputList means, vars, counters;
    OP_REQUIRES_OK(ctx, ctx->input_list("moving_mean", &means));
    OP_REQUIRES_OK(ctx, ctx->input_list("moving_variance", &vars));
    OP_REQUIRES_OK(ctx, ctx->input_list("num_updates", &counters));
    OP_REQUIRES_OK(ctx, CheckListSizes(means, vars, counters));
    const Tensor& mean = ctx->input(ctx->num_inputs() - 3);
    const Tensor& var = ctx->input(ctx->num_inputs() - 2);
    const Tensor& count = ctx->input(ctx->num_inputs() - 1);
    OP_REQUIRES(ctx, mean.dims() == 1,
                errors::InvalidArgument("mean must be a vector [C], got ",
                                        mean.shape().DebugString()));
    const int64_t c = mean.dim_size(0);
    OP_REQUIRES_OK(ctx, CheckVector(var, "variance", c));
    OP_REQUIRES(ctx, count.dims() == 0,
                errors::InvalidArgument("count must be a scalar"));
    const int64_t n = count.scalar<int64_t>()();
    OP_REQUIRES(ctx, n >= (unbiased_ ? 2 : 1),
                errors::InvalidArgument(
                    "count must be >= ", unbiased_ ? 2 : 1,
                    " (values reduced per channel", unbiased_
                        ? ", for the Bessel correction)" : ")", ", got ", n));
    MovingVars<U> mv;
    OP_REQUIRES_OK(ctx, mv.Lookup(ctx, means, vars, counters, c));
    VarLocks locks(mv.all(), /*exclusive=*/true);
    OP_REQUIRES_OK(ctx, mv.template PrepareAll<Device>(ctx));
    if (c == 0) return;
    kernels::UpdateParams p;
    p.dtype = std::is_same<U, double>::value ? kernels::DType::kFloat64
                                             : kernels::DType::kFloat32;
    p.channels = c;
    p.mean = mean.data();
    p.var = var.data();
    p.count = n;
    p.moving_mean = mv.mean->tensor()->data();
    p.moving_var = mv.var->tensor()->data();
    p.num_updates =
        mv.counter ? static_cast<int64_t*>(mv.counter->tensor()->data()) : nullptr;
    p.momentum = momentum_;
    p.unbiased_variance = unbiased_;
    OP_REQUIRES_OK(ctx, Backend<Device>::Update(ctx, p));
  }

 private:
  float momentum_;
  bool unbiased_;
};

// The backward split at its reduction, for sync BN (fused_bn/_distribute.py):
// BackwardReduce gives the local sums, which are all-reduced, and
// BackwardApply the dx pass from the global sums and count.
template <typename Device, typename T, typename U>
class BackwardReduceOp : public OpKernel {
 public:
  explicit BackwardReduceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    kernels::Shape shape;
    OP_REQUIRES_OK(ctx, ShapeOf(x, format_, &shape));
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                errors::InvalidArgument("dy must have x's shape ",
                                        x.shape().DebugString(), ", got ",
                                        dy.shape().DebugString()));
    const int64_t c = shape.channels;
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(2), "mean", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(3), "inv_std", c));
    Tensor *sum_dy, *sum_dy_xhat;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({c}), &sum_dy));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &sum_dy_xhat));
    if (c == 0) return;
    kernels::BackwardParams p;
    p.dtype = DTypeOf<T>();
    p.shape = shape;
    p.dy = dy.data();
    p.x = x.data();
    p.saved_mean = ctx->input(2).data();
    p.saved_inv_std = ctx->input(3).data();
    p.dscale = sum_dy_xhat->data();
    p.doffset = sum_dy->data();
    OP_REQUIRES_OK(ctx, Backend<Device>::Backward(ctx, p));
  }

 private:
  std::string format_;
};

template <typename Device, typename T, typename U>
class BackwardApplyOp : public OpKernel {
 public:
  explicit BackwardApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("data_format", &format_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    kernels::Shape shape;
    OP_REQUIRES_OK(ctx, ShapeOf(x, format_, &shape));
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                errors::InvalidArgument("dy must have x's shape ",
                                        x.shape().DebugString(), ", got ",
                                        dy.shape().DebugString()));
    const int64_t c = shape.channels;
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(2), "scale", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(3), "mean", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(4), "inv_std", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(5), "sum_dy", c));
    OP_REQUIRES_OK(ctx, CheckVector(ctx->input(6), "sum_dy_xhat", c));
    const Tensor& count = ctx->input(7);
    OP_REQUIRES(ctx, count.dims() == 0,
                errors::InvalidArgument("count must be a scalar, got shape ",
                                        count.shape().DebugString()));
    const int64_t n = count.scalar<int64_t>()();
    OP_REQUIRES(ctx, n >= 1,
                errors::InvalidArgument(
                    "count must be >= 1 (values per channel the sums span), "
                    "got ", n));
    Tensor* dx;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    if (c == 0) return;
    kernels::BackwardParams p;
    p.dtype = DTypeOf<T>();
    p.shape = shape;
    p.dy = dy.data();
    p.x = x.data();
    p.scale = ctx->input(2).data();
    p.saved_mean = ctx->input(3).data();
    p.saved_inv_std = ctx->input(4).data();
    p.sum_dy = ctx->input(5).data();
    p.sum_dy_xhat = ctx->input(6).data();
    p.count = n;
    p.dx = dx->data();
    OP_REQUIRES_OK(ctx, Backend<Device>::Backward(ctx, p));
  }

 private:
  std::string format_;
};

#define FUSED_BN_REGISTER_SPLIT_BACKWARD(DEVICE, DEV_T, T, U)  \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>BackwardReduce")       \
                              .Device(DEVICE)                  \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<U>("U"),         \
                          BackwardReduceOp<DEV_T, T, U>);      \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>BackwardApply")        \
                              .Device(DEVICE)                  \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<U>("U")          \
                              .HostMemory("count"),            \
                          BackwardApplyOp<DEV_T, T, U>)

// Registers every op for one device. HOST is HostMemory on GPU, a no-op
// marker on CPU.
#define FUSED_BN_REGISTER_TU(DEVICE, DEV_T, T, U)                             \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>Forward")                            \
                              .Device(DEVICE)                                \
                              .TypeConstraint<T>("T")                        \
                              .TypeConstraint<U>("U")                        \
                              .HostMemory("training"),                       \
                          ForwardOp<DEV_T, T, U>);                           \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>ForwardGrad")                        \
                              .Device(DEVICE)                                \
                              .TypeConstraint<T>("T")                        \
                              .TypeConstraint<U>("U")                        \
                              .HostMemory("training"),                       \
                          ForwardGradOp<DEV_T, T, U>);                       \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>Moments")                            \
                              .Device(DEVICE)                                \
                              .TypeConstraint<T>("T")                        \
                              .TypeConstraint<U>("U"),                       \
                          MomentsOp<DEV_T, T, U>);                           \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>Normalize")                          \
                              .Device(DEVICE)                                \
                              .TypeConstraint<T>("T")                        \
                              .TypeConstraint<U>("U"),                       \
                          NormalizeOp<DEV_T, T, U>)

#define FUSED_BN_REGISTER_U(DEVICE, DEV_T, U)                  \
  REGISTER_KERNEL_BUILDER(Name("FusedBn>UpdateMovingStats")    \
                              .Device(DEVICE)                  \
                              .TypeConstraint<U>("U")          \
                              .HostMemory("count"),            \
                          UpdateMovingStatsOp<DEV_T, U>)

}  // namespace fused_bn_tf
}  // namespace tensorflow
