"""fused_bn for TF1 graph mode (tf.compat.v1 sessions, variable scopes)."""
import tensorflow as tf

from ..ops import _check_x, _channels, _data_format, _stat_dtype, batch_norm as _batch_norm
from ._inference_graph import inference_graph_def

__all__ = ["batch_norm", "inference_graph_def"]

_v1 = tf.compat.v1


def batch_norm(x, training, scope=None, warmup=True, *, momentum=0.99,
               epsilon=1e-3, center=True, scale=True, axis=-1,
               unbiased_variance=True, synchronized=False, name=None):
    """Batch norm whose variables live in a variable scope.

    Creates or reuses (AUTO_REUSE) `gamma`, `beta`, `moving_mean`,
    `moving_variance` and, with warmup, the int64 counter `num_updates` under
    `scope`, so a training graph and a test graph built with the same scope
    share their statistics. The moving statistics are non-trainable and in
    the GLOBAL_VARIABLES and MODEL_VARIABLES collections: a plain
    `tf.compat.v1.train.Saver()` saves them. They are updated by the op
    itself when `training` is true at run time: nothing to add to
    UPDATE_OPS, no control dependencies. `training` may be a Python bool or
    a bool placeholder. `synchronized` is `fused_bn.batch_norm`'s (global-batch
    statistics across tf.distribute replicas).
    """
    x = _check_x(x)
    data_format = _data_format(x, axis)
    c = _channels(x, data_format)
    if not isinstance(c, int):
        raise ValueError(
            f"x's channel dimension must be known to create variables, got shape {x.shape}")
    u = _stat_dtype(x.dtype)
    stats = [_v1.GraphKeys.GLOBAL_VARIABLES, _v1.GraphKeys.MODEL_VARIABLES]
    with _v1.variable_scope(scope, default_name="BatchNorm", reuse=_v1.AUTO_REUSE):
        gamma = beta = counter = None
        if scale:
            gamma = _v1.get_variable("gamma", [c], u, _v1.ones_initializer(),
                                     use_resource=True)
        if center:
            beta = _v1.get_variable("beta", [c], u, _v1.zeros_initializer(),
                                    use_resource=True)
        moving_mean = _v1.get_variable(
            "moving_mean", [c], u, _v1.zeros_initializer(), trainable=False,
            collections=stats, use_resource=True)
        moving_variance = _v1.get_variable(
            "moving_variance", [c], u, _v1.ones_initializer(), trainable=False,
            collections=stats, use_resource=True)
        if warmup:
            counter = _v1.get_variable(
                "num_updates", [], tf.int64, _v1.zeros_initializer(),
                trainable=False, collections=stats, use_resource=True)
        return _batch_norm(
            x, training, gamma, beta, moving_mean, moving_variance,
            momentum=momentum, epsilon=epsilon, axis=axis,
            unbiased_variance=unbiased_variance, num_updates=counter,
            synchronized=synchronized, name=name)
