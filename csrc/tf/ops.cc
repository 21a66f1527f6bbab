// Op definitions and shape functions. Every op is namespaced "FusedBn>".
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// x: rank 2 to 5; *channels = its channel dimension per data_format.
absl::Status ChannelDim(InferenceContext* c, int index,
                        DimensionHandle* channels) {
  std::string format;
  TF_RETURN_IF_ERROR(c->GetAttr("data_format", &format));
  ShapeHandle x = c->input(index);
  if (!c->WithRankAtLeast(x, 2, &x).ok() || !c->WithRankAtMost(x, 5, &x).ok()) {
    return errors::InvalidArgument("x must have rank 2 to 5, got shape ",
                                   c->DebugString(c->input(index)));
  }
  *channels = c->RankKnown(x)
                  ? c->Dim(x, format == "channels_last" ? -1 : 1)
                  : c->UnknownDim();
  return absl::OkStatus();
}

// Input `index` (named `name`) must be a [C] vector; merges C.
absl::Status ChannelVector(InferenceContext* c, int index, const char* name,
                           DimensionHandle* channels) {
  ShapeHandle v;
  if (!c->WithRank(c->input(index), 1, &v).ok()) {
    return errors::InvalidArgument(name, " must be a vector of shape [C], got ",
                                   c->DebugString(c->input(index)));
  }
  if (!c->Merge(*channels, c->Dim(v, 0), channels).ok()) {
    return errors::InvalidArgument(name, " must have C=", c->DebugString(*channels),
                                   " elements (x's channel dimension), got ",
                                   c->DebugString(c->Dim(v, 0)));
  }
  return absl::OkStatus();
}

absl::Status Scalar(InferenceContext* c, int index, const char* name) {
  ShapeHandle unused;
  if (!c->WithRank(c->input(index), 0, &unused).ok()) {
    return errors::InvalidArgument(name, " must be a scalar, got shape ",
                                   c->DebugString(c->input(index)));
  }
  return absl::OkStatus();
}

// The optional list input `name` (at most one tensor) must have x's shape;
// *x is merged with it.
absl::Status OptionalLikeX(InferenceContext* c, const char* name, ShapeHandle* x) {
  std::vector<ShapeHandle> list;
  TF_RETURN_IF_ERROR(c->input(name, &list));
  if (list.size() > 1) {
    return errors::InvalidArgument(name, " takes at most one tensor, got ",
                                   list.size());
  }
  if (!list.empty() && !c->Merge(*x, list[0], x).ok()) {
    return errors::InvalidArgument(name, " must have x's shape ",
                                   c->DebugString(*x), ", got ",
                                   c->DebugString(list[0]));
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("FusedBn>Forward")
    .Input("x: T")
    .Input("scale: U")
    .Input("offset: U")
    .Input("moving_mean: num_moving * resource")
    .Input("moving_variance: num_moving * resource")
    .Input("num_updates: num_counters * resource")
    .Input("side_input: num_side * T")
    .Input("training: bool")
    .Output("y: T")
    .Output("saved_mean: U")
    .Output("saved_inv_std: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("num_moving: int >= 0")
    .Attr("num_counters: int >= 0")
    .Attr("num_side: int >= 0 = 0")
    .Attr("epsilon: float")
    .Attr("momentum: float")
    .Attr("unbiased_variance: bool = true")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .Attr("activation: {'none', 'relu'} = 'none'")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle ch;
      TF_RETURN_IF_ERROR(ChannelDim(c, 0, &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 1, "scale", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 2, "offset", &ch));
      TF_RETURN_IF_ERROR(Scalar(c, c->num_inputs() - 1, "training"));
      ShapeHandle y = c->input(0);
      TF_RETURN_IF_ERROR(OptionalLikeX(c, "side_input", &y));
      c->set_output(0, y);
      c->set_output(1, c->Vector(ch));
      c->set_output(2, c->Vector(ch));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Batch-norm forward. Training: batch moments, normalize, in-place moving
average update of moving_mean/moving_variance (and num_updates). Inference:
normalize with the moving statistics. saved_mean/saved_inv_std are the
statistics used, for the gradient. Epilogue: y = activation(bn(x) +
side_input) (side_input optional, x's shape), in the normalize pass.
)doc");

REGISTER_OP("FusedBn>ForwardGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")
    .Input("saved_mean: U")
    .Input("saved_inv_std: U")
    .Input("training: bool")
    .Input("y: num_y * T")
    .Output("dx: T")
    .Output("dscale: U")
    .Output("doffset: U")
    .Output("dside: num_dside * T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .Attr("num_y: int >= 0 = 0")
    .Attr("num_dside: int >= 0 = 0")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle ch;
      TF_RETURN_IF_ERROR(ChannelDim(c, 1, &ch));
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &x));
      TF_RETURN_IF_ERROR(ChannelVector(c, 2, "scale", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 3, "saved_mean", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 4, "saved_inv_std", &ch));
      TF_RETURN_IF_ERROR(Scalar(c, 5, "training"));
      TF_RETURN_IF_ERROR(OptionalLikeX(c, "y", &x));
      int num_dside;
      TF_RETURN_IF_ERROR(c->GetAttr("num_dside", &num_dside));
      if (num_dside > 1) {
        return errors::InvalidArgument("num_dside must be 0 or 1, got ", num_dside);
      }
      c->set_output(0, x);
      c->set_output(1, c->Vector(ch));
      c->set_output(2, c->Vector(ch));
      if (num_dside == 1) c->set_output(3, x);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of Forward. y (optional): the forward's output when its activation
was relu; dy is then masked by y > 0 first. dside (num_dside = 1): the
gradient of the forward's side_input, the masked dy.
)doc");

REGISTER_OP("FusedBn>BackwardReduce")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: U")
    .Input("inv_std: U")
    .Output("sum_dy: U")
    .Output("sum_dy_xhat: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle ch;
      TF_RETURN_IF_ERROR(ChannelDim(c, 1, &ch));
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &x));
      TF_RETURN_IF_ERROR(ChannelVector(c, 2, "mean", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 3, "inv_std", &ch));
      c->set_output(0, c->Vector(ch));
      c->set_output(1, c->Vector(ch));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The backward's reduction alone: per channel sum(dy) and
sum(dy * (x - mean) * inv_std), over this x only (sync BN all-reduces them).
)doc");

REGISTER_OP("FusedBn>BackwardApply")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")
    .Input("mean: U")
    .Input("inv_std: U")
    .Input("sum_dy: U")
    .Input("sum_dy_xhat: U")
    .Input("count: int64")
    .Output("dx: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle ch;
      TF_RETURN_IF_ERROR(ChannelDim(c, 1, &ch));
      ShapeHandle x;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &x));
      TF_RETURN_IF_ERROR(ChannelVector(c, 2, "scale", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 3, "mean", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 4, "inv_std", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 5, "sum_dy", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 6, "sum_dy_xhat", &ch));
      TF_RETURN_IF_ERROR(Scalar(c, 7, "count"));
      c->set_output(0, x);
      return absl::OkStatus();
    })
    .Doc(R"doc(
The training backward's dx pass from given sums over `count` values per
channel (sync BN: the all-reduced sums and the global count):
dx = scale * inv_std * (dy - sum_dy / count - x_hat * sum_dy_xhat / count).
)doc");

REGISTER_OP("FusedBn>Moments")
    .Input("x: T")
    .Output("mean: U")
    .Output("variance: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle ch;
      TF_RETURN_IF_ERROR(ChannelDim(c, 0, &ch));
      c->set_output(0, c->Vector(ch));
      c->set_output(1, c->Vector(ch));
      return absl::OkStatus();
    });

REGISTER_OP("FusedBn>Normalize")
    .Input("x: T")
    .Input("mean: U")
    .Input("variance: U")
    .Input("scale: U")
    .Input("offset: U")
    .Input("side_input: num_side * T")
    .Output("y: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .Attr("num_side: int >= 0 = 0")
    .Attr("activation: {'none', 'relu'} = 'none'")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle ch;
      TF_RETURN_IF_ERROR(ChannelDim(c, 0, &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 1, "mean", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 2, "variance", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 3, "scale", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, 4, "offset", &ch));
      ShapeHandle y = c->input(0);
      TF_RETURN_IF_ERROR(OptionalLikeX(c, "side_input", &y));
      c->set_output(0, y);
      return absl::OkStatus();
    })
    .Doc(R"doc(
y = activation((x - mean) * scale * rsqrt(variance + epsilon) + offset +
side_input), side_input optional (x's shape).
)doc");

REGISTER_OP("FusedBn>UpdateMovingStats")
    .Input("moving_mean: resource")
    .Input("moving_variance: resource")
    .Input("num_updates: num_counters * resource")
    .Input("mean: U")
    .Input("variance: U")
    .Input("count: int64")
    .Attr("U: {float, double}")
    .Attr("num_counters: int >= 0")
    .Attr("momentum: float")
    .Attr("unbiased_variance: bool = true")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      const int n = c->num_inputs();
      DimensionHandle ch = c->UnknownDim();
      TF_RETURN_IF_ERROR(ChannelVector(c, n - 3, "mean", &ch));
      TF_RETURN_IF_ERROR(ChannelVector(c, n - 2, "variance", &ch));
      TF_RETURN_IF_ERROR(Scalar(c, n - 1, "count"));
      return absl::OkStatus();
    });

}  // namespace tensorflow
