"""fused_bn: fast batch normalization for TensorFlow that is hard to misuse.

    y = fused_bn.batch_norm(x, training, scale, offset, moving_mean,
                            moving_variance, num_updates=counter)

One op computes moments (only when training), normalizes, and updates the
moving statistics in place: no UPDATE_OPS, no control dependencies.
"""
from ._loader import build_info
from .ops import batch_norm, moments, normalize, update_moving_stats
from . import compat
from . import export
from .layers import BatchNormalization

__version__ = "0.1.0"

__all__ = ["batch_norm", "moments", "normalize", "update_moving_stats",
           "build_info", "compat", "export", "BatchNormalization"]
