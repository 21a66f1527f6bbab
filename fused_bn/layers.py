"""`fused_bn.BatchNormalization`: a Keras 3 drop-in for
`keras.layers.BatchNormalization` backed by the fused op."""
import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers
from keras.src.backend import in_stateless_scope

from . import _distribute, reference
from .ops import (_check_activation, _check_training, _stat_dtype, batch_norm,
                  normalize, update_moving_stats)

__all__ = ["BatchNormalization"]


def _keras_mask(t):
    """The Keras mask attached to a tensor, or None (older Keras 3 releases,
    e.g. 3.3, keep it in the attribute; newer ones through get_keras_mask)."""
    get = getattr(keras.src.backend, "get_keras_mask", None)
    return get(t) if get is not None else getattr(t, "_keras_mask", None)


@keras.saving.register_keras_serializable(package="fused_bn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization layer; one fused op per call.

    Same arguments, weights (`gamma`, `beta`, `moving_mean`,
    `moving_variance`) and numerics as `keras.layers.BatchNormalization`,
    plus:

    - `num_updates`: an int64 non-trainable weight, the warm-up counter.
    - `warmup=True`: until the EMA horizon is reached, the moving statistics
      are the exact average of the batches seen so far (update t uses
      momentum `min(momentum, t / (t + 1))`): no cold start. `False` is plain
      EMA, as Keras does.
    - `unbiased_variance=True`: the moving variance receives the
      Bessel-corrected batch variance, as TF1's fused batch norm did. Keras
      uses the biased one: `warmup=False, unbiased_variance=False` matches
      `keras.layers.BatchNormalization` exactly.
    - `activation=None` or `"relu"`, and the call argument `side_input` (a
      tensor of the input's shape, e.g. a residual branch): the layer
      returns `activation(bn(inputs) + side_input)`, computed inside the
      normalize pass (a ResNet block's `add` + `relu` tail in one op).

    The op updates the moving statistics in place when it runs in training
    mode (no `add_update`, no assigns). `training=True` with
    `trainable=False` runs in inference mode, as Keras' layer does.

    `axis` is the channel axis and must be the last or the second axis
    (channels-last or channels-first) of an input of rank 2 to 5.
    `renorm=True` is not supported.

    tf.distribute (`MirroredStrategy`, `MultiWorkerMirroredStrategy`):
    `synchronized=True` normalizes with the statistics of the global batch
    (all replicas and workers), as Keras' `synchronized=True` does. In
    both modes the moving statistics are updated with the global batch's
    statistics, so every replica holds the same values (Keras' layer lets
    them diverge when not synchronized). With a mask, the same over the
    unmasked positions (synchronized: those of the global batch).

    Masks (`mask=`, or the mask Keras attaches, e.g. after `Masking` or
    `Embedding(mask_zero=True)`) work as in Keras: the shape of the inputs
    without the last axis; in training, the batch statistics are over the
    unmasked positions only and the moving statistics are updated with
    them (the Bessel factor with the unmasked count); every position is
    normalized; inference ignores the mask; the mask is passed on to the
    next layer. With `side_input` the mask is still the inputs' (Keras
    does not pass it to a call with two tensor arguments; the layer reads
    it), and the output carries the inputs' mask, whatever side_input
    carries. A training batch with fewer than 2 unmasked values in a
    channel (e.g. all padding) leaves the moving statistics and counter
    unchanged (Keras would pull them towards mean 0 and variance 0). The
    masked path runs the moments as TF ops and normalizes with
    `fused_bn.normalize`; without a mask it is the one fused op.

    XLA: the custom op cannot be compiled by XLA, so the layer declares
    `supports_jit = False` (Keras then compiles the model without XLA). Inside
    a `tf.function(jit_compile=True)` it runs `fused_bn.reference.batch_norm`,
    plain TensorFlow ops with the same semantics on the same variables.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True,
                 scale=True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros",
                 moving_variance_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, synchronized=False, renorm=False,
                 renorm_clipping=None, renorm_momentum=0.99, warmup=True,
                 unbiased_variance=True, activation=None, **kwargs):
        super().__init__(**kwargs)
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "fused_bn.BatchNormalization runs a TensorFlow op and needs "
                "the Keras TensorFlow backend (KERAS_BACKEND=tensorflow), got "
                f"{keras.backend.backend()!r}")
        if renorm:
            raise ValueError(
                "fused_bn.BatchNormalization does not support renorm=True; "
                "use keras.layers.BatchNormalization(renorm=True)")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if not float(epsilon) > 0.0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.warmup = bool(warmup)
        self.unbiased_variance = bool(unbiased_variance)
        self.synchronized = bool(synchronized)
        _check_activation(activation)
        self.activation = activation
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_jit = False
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_updates = None

    def _op_axis(self, rank):
        """-1 or 1, the op's channel axis for an input of this rank."""
        if not 2 <= rank <= 5:
            raise ValueError(
                "fused_bn.BatchNormalization needs inputs of rank 2 to 5, got "
                f"rank {rank}")
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"axis {self.axis} is out of bounds for an input of rank {rank}")
        axis = self.axis % rank
        if axis == rank - 1:
            return -1
        if axis == 1:
            return 1
        raise ValueError(
            "fused_bn.BatchNormalization supports the channel axis -1 "
            f"(channels-last) or 1 (channels-first), got axis={self.axis} for "
            f"an input of rank {rank}; use keras.layers.BatchNormalization "
            "for other axes")

    def build(self, input_shape):
        rank = len(input_shape)
        self._axis = self._op_axis(rank)
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                "the channel dimension (axis "
                f"{self.axis}) of the input must be known, got shape "
                f"{tuple(input_shape)}")
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint, trainable=True,
                autocast=False)
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint, trainable=True,
                autocast=False)
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean",
            initializer=self.moving_mean_initializer, trainable=False,
            autocast=False)
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance",
            initializer=self.moving_variance_initializer, trainable=False,
            autocast=False)
        self.num_updates = self.add_weight(
            shape=(), name="num_updates", initializer="zeros", dtype="int64",
            trainable=False, autocast=False)
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={self.axis: channels})

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, inputs, training=None, mask=None, side_input=None):
        if side_input is not None and mask is None:
            # Keras passes the inputs' mask to call() only when they are the
            # one tensor argument (with two it looks for `inputs_mask`).
            mask = _keras_mask(inputs)
        if training is None or not self.trainable:
            training = False
        x = tf.cast(inputs, self.compute_dtype)
        if side_input is not None:
            side_input = tf.cast(side_input, self.compute_dtype)
        if mask is not None:
            mask = reference.check_mask(mask, x)
            if training is not False:
                return self._masked_call(x, training, mask, side_input)
        # Keras traces call() in a stateless scope to infer shapes (e.g. a
        # subclassed model's first call): variables have no buffers there.
        fn = (reference.batch_norm
              if reference.in_xla_context() or in_stateless_scope()
              else batch_norm)
        return fn(
            x, training, self.gamma, self.beta, self.moving_mean,
            self.moving_variance, momentum=self.momentum, epsilon=self.epsilon,
            axis=self._axis, unbiased_variance=self.unbiased_variance,
            num_updates=self.num_updates if self.warmup else None,
            synchronized=self.synchronized, side_input=side_input,
            activation=self.activation)

    def _masked_call(self, x, training, mask, side_input):
        """Training (or a bool tensor) with a mask: statistics over the
        unmasked positions, every position normalized. Under XLA, and in
        the stateless scope where Keras traces call() to infer shapes (the
        variables have no buffers there), the pure-TF reference."""
        if reference.in_xla_context() or in_stateless_scope():
            return reference.batch_norm(
                x, training, self.gamma, self.beta, self.moving_mean,
                self.moving_variance, momentum=self.momentum,
                epsilon=self.epsilon, axis=self._axis,
                unbiased_variance=self.unbiased_variance,
                num_updates=self.num_updates if self.warmup else None,
                side_input=side_input, activation=self.activation, mask=mask)
        training, training_value = _check_training(training)
        if training_value is not False and _distribute.replica_context() is not None:
            return self._masked_replica_call(x, training, training_value, mask,
                                             side_input)

        def batch_stats():
            mean, variance, count = reference.masked_moments(x, mask, self._axis)
            tf.cond(tf.reduce_min(count) >= 2,
                    lambda: self._update_masked(mean, variance, count),
                    lambda: None)
            return mean, variance

        def moving_stats():
            return (tf.convert_to_tensor(self.moving_mean),
                    tf.convert_to_tensor(self.moving_variance))

        if training_value is None:
            mean, variance = tf.cond(training, batch_stats, moving_stats)
        else:
            mean, variance = batch_stats() if training_value else moving_stats()
        return normalize(x, mean, variance, self.gamma, self.beta,
                         self.epsilon, axis=self._axis, side_input=side_input,
                         activation=self.activation)

    def _masked_replica_call(self, x, training, training_value, mask, side_input):
        """`_masked_call` in a tf.distribute replica context with several
        replicas: each replica's masked moments, merged by one all-reduce
        (`_distribute.merge_moments`, per-channel counts). Synchronized, the
        normalization uses the unmasked positions of the global batch;
        otherwise the replica's own. Either way the moving statistics get
        the global batch's, alike on every replica, unless a channel has
        fewer than 2 unmasked values in it. A tensor `training` does not
        skip the all-reduce (it cannot sit in a tf.cond branch), only the
        moments and the update."""
        live = True if training_value else training
        u = _stat_dtype(x.dtype)
        c = x.shape[self._axis]

        def local():
            return reference.masked_moments(x, mask, self._axis)

        def idle():
            zero = tf.zeros([c], u)
            return zero, zero, tf.zeros([c], tf.int64)

        mean, variance, count = local() if live is True else tf.cond(live, local, idle)
        moving = (tf.stop_gradient(tf.convert_to_tensor(self.moving_mean)),
                  tf.stop_gradient(tf.convert_to_tensor(self.moving_variance)))
        batch, pooled = _distribute.merge_moments(count, mean, variance,
                                                  moving[0], self.synchronized)
        mean, variance = batch[:2]
        ready = tf.reduce_min(pooled[2]) >= 2
        if live is not True:
            mean = tf.where(live, mean, moving[0])
            variance = tf.where(live, variance, moving[1])
            ready = tf.logical_and(live, ready)
        tf.cond(ready, lambda: self._update_masked(*pooled), lambda: None)
        return normalize(x, mean, variance, self.gamma, self.beta,
                         self.epsilon, axis=self._axis, side_input=side_input,
                         activation=self.activation)

    def _update_masked(self, mean, variance, count):
        """The moving update with masked statistics; count: [C] int64, >= 2."""
        unbiased = self.unbiased_variance
        if self._axis == 1:
            # Channels-first masks include the channel axis: a count per
            # channel, so the Bessel factor (bn_math.h's, through its
            # mirror) is applied here, per channel.
            variance = tf.cast(reference.batch_variance(
                variance, reference.bessel_factor(unbiased, count)),
                variance.dtype)
            unbiased = False
        update_moving_stats(
            self.moving_mean, self.moving_variance, mean, variance,
            tf.reduce_min(count), self.momentum, unbiased_variance=unbiased,
            num_updates=self.num_updates if self.warmup else None)

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "warmup": self.warmup,
            "unbiased_variance": self.unbiased_variance,
            "synchronized": self.synchronized,
            "activation": self.activation,
        }
        return {**super().get_config(), **config}
