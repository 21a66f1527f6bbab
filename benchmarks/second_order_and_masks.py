"""What second-order gradients and masks cost, in one run.

    python -m benchmarks.second_order_and_masks            # CPU, ~2 minutes
    python -m benchmarks.second_order_and_masks --quick    # smoke run

Every implementation is one tf.function (jit_compile=False), warmed up,
then timed interleaved: repetition r runs them in an order rotated by r.
Reported: the median time per call and its ratio to the first row.

gradient_penalty (x NHWC float32): d/d(scale, offset, x) of ||dL/dx||^2,
L = sum(softplus(bn(x)) * w), training mode, for
  fused_bn   fused_bn.batch_norm (composite TF gradient of the backward op)
  stock      tf.compat.v1.nn.fused_batch_norm (FusedBatchNormV3, whose
             backward's gradient is also composite TF ops)
  composite  reduce_mean moments + tf.nn.batch_normalization
and, for scale, the first-order fwd+bwd of fused_bn.
masked_layer ([N, T, C] float32, 60% of the steps kept): a training step of
the Keras layer (forward, gradients for a given dy, SGD on gamma and beta),
fused_bn and keras.layers.BatchNormalization, with and without the mask.
"""
import argparse
import time

import numpy as np
import tensorflow as tf

EPS = 1e-3


def _time(fns, reps, inner):
    """Median seconds per call of each fn, interleaved with rotation."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                out = fns[n]()
            tf.nest.map_structure(lambda t: t.numpy(), out)
            times[n].append((time.perf_counter() - start) / inner)
    return {n: float(np.median(t)) for n, t in times.items()}


def _gradient_penalty_fns(shape):
    import fused_bn
    rng = np.random.default_rng(0)
    c = shape[-1]
    x = tf.Variable(rng.normal(0, 1, shape).astype("float32"))
    w = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    scale = tf.Variable(np.ones(c, "float32"))
    offset = tf.Variable(np.zeros(c, "float32"))

    def fused(x):
        return fused_bn.batch_norm(x, True, scale, offset, epsilon=EPS)

    def stock(x):
        return tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=EPS,
                                                is_training=True)[0]

    def composite(x):
        mean = tf.reduce_mean(x, [0, 1, 2])
        var = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
        return tf.nn.batch_normalization(x, mean, var, offset, scale, EPS)

    def penalty_grads(bn):
        @tf.function(jit_compile=False)
        def step():
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    loss = tf.reduce_sum(tf.nn.softplus(bn(x)) * w)
                g = inner.gradient(loss, x)
                penalty = tf.reduce_sum(tf.square(g))
            return outer.gradient(penalty, [scale, offset, x])
        return step

    @tf.function(jit_compile=False)
    def first_order():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.softplus(fused(x)) * w)
        return tape.gradient(loss, [scale, offset, x])

    return {"fused_bn": penalty_grads(fused), "stock": penalty_grads(stock),
            "composite": penalty_grads(composite),
            "fused_bn first order": first_order}


def _masked_layer_fns(shape):
    import keras
    import fused_bn
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(1, 2, shape).astype("float32"))
    dy = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    mask = tf.constant(rng.random(shape[:-1]) < 0.6)
    fns = {}
    for name, layer in (("fused_bn", fused_bn.BatchNormalization()),
                        ("keras", keras.layers.BatchNormalization())):
        layer.build(shape)
        opt = keras.optimizers.SGD(0.01)
        opt.build(layer.trainable_variables)
        for masked in (True, False):
            def step(layer=layer, opt=opt, masked=masked):
                with tf.GradientTape() as tape:
                    y = layer(x, training=True, mask=mask if masked else None)
                grads = tape.gradient(y, layer.trainable_variables, output_gradients=dy)
                opt.apply(grads, layer.trainable_variables)
                return grads
            fns[f"{name}{' masked' if masked else ''}"] = tf.function(step, jit_compile=False)
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    args = parser.parse_args(argv)
    gp_shape = (2, 4, 4, 8) if args.quick else (32, 28, 28, 128)
    seq_shape = (4, 6, 8) if args.quick else (64, 128, 256)
    reps, inner = (2, 1) if args.quick else (15, 3)
    print(f"tensorflow {tf.__version__}, intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")
    for title, fns in ((f"gradient_penalty {'x'.join(map(str, gp_shape))}",
                        _gradient_penalty_fns(gp_shape)),
                       (f"masked_layer {'x'.join(map(str, seq_shape))}",
                        _masked_layer_fns(seq_shape))):
        times = _time(fns, reps, inner)
        first = next(iter(times.values()))
        print(f"\n{title}\n{'implementation':<22}{'ms':>10}{'ratio':>8}")
        for name, t in times.items():
            print(f"{name:<22}{t * 1e3:>10.2f}{t / first:>8.2f}")


if __name__ == "__main__":
    main()
