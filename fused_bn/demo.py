"""End-to-end demo: a small CNN with fused_bn.BatchNormalization on
scikit-learn's bundled digits (8x8 images, offline), train/test switching,
save/reload, the cold-start problem and its fix, and a CPU timing.

    python -m fused_bn.demo [--out DIR] [--epochs N] [--quick]

Writes DIR/demo_model.keras and DIR/demo.png (default DIR: ./out).
"""
import argparse
import os
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

import fused_bn


def load_digits(seed=0):
    """(x_train, y_train, x_test, y_test): [N, 8, 8, 1] in [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits as sk_load_digits
    digits = sk_load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    order = np.random.RandomState(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def make_model(momentum=0.99, warmup=True, seed=0):
    keras.utils.set_random_seed(seed)

    def bn():
        return fused_bn.BatchNormalization(momentum=momentum, warmup=warmup)

    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.ReLU()(bn()(h))
    h = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(h)
    h = keras.layers.ReLU()(bn()(h))
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(h)
    h = keras.layers.ReLU()(bn()(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(h)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    return model


def accuracy(model, x, y):
    """Accuracy in inference mode (training=False: the moving statistics)."""
    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


class InferenceAccuracy(keras.callbacks.Callback):
    """Records train and test accuracy with training=False after each epoch."""

    def __init__(self, data):
        super().__init__()
        self.data = data
        self.train, self.test = [], []

    def on_epoch_end(self, epoch, logs=None):
        x_train, y_train, x_test, y_test = self.data
        self.train.append(accuracy(self.model, x_train, y_train))
        self.test.append(accuracy(self.model, x_test, y_test))


def train(data, epochs):
    x_train, y_train, x_test, y_test = data
    model = make_model()
    history = InferenceAccuracy(data)
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=1,
              callbacks=[history])
    return model, history


def save_and_reload(model, out_dir, x):
    path = os.path.join(out_dir, "demo_model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    same = np.array_equal(model.predict(x, verbose=0),
                          reloaded.predict(x, verbose=0))
    return path, same


def moving_stat_error(x, momentum, steps, batch=32, seed=0):
    """|moving mean - data mean| per step of one layer on the digit pixels."""
    flat = x.reshape(len(x), -1).astype("float32")
    true_mean = flat.astype(np.float64).mean(0)
    rng = np.random.RandomState(seed)
    errors = {}
    for warmup in (True, False):
        layer = fused_bn.BatchNormalization(momentum=momentum, warmup=warmup)
        errs = []
        for _ in range(steps):
            layer(flat[rng.randint(0, len(flat), batch)], training=True)
            errs.append(float(np.mean(np.abs(layer.moving_mean.numpy() - true_mean))))
        errors[warmup] = errs
    return errors


def cold_start(data, momentum, steps, every):
    """Test accuracy (training=False) during the first steps at high momentum."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.RandomState(1)
    curves = {}
    for warmup in (True, False):
        model = make_model(momentum=momentum, warmup=warmup)
        acc = []
        for step in range(1, steps + 1):
            idx = rng.randint(0, len(x_train), 32)
            model.train_on_batch(x_train[idx], y_train[idx])
            if step % every == 0:
                acc.append((step, accuracy(model, x_test, y_test)))
        curves[warmup] = acc
    return curves


def time_training_step(shape=(32, 56, 56, 64), repeats=9, iters=3):
    """Median ms of a training forward+backward, fused_bn vs the stock op,
    measured interleaved; both update moving statistics."""
    c = shape[-1]
    x = tf.random.normal(shape)
    dy = tf.random.normal(shape)
    gamma, beta = tf.Variable(tf.ones([c])), tf.Variable(tf.zeros([c]))
    mean = [tf.Variable(tf.zeros([c])) for _ in range(2)]
    var = [tf.Variable(tf.ones([c])) for _ in range(2)]

    @tf.function
    def ours(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fused_bn.batch_norm(x, True, gamma, beta, mean[0], var[0])
        return tape.gradient(y, [x, gamma, beta], output_gradients=dy)

    @tf.function
    def stock(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, m, v = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean[1], var[1], epsilon=1e-3, is_training=True,
                exponential_avg_factor=0.01)
        mean[1].assign(m)
        var[1].assign(v)
        return tape.gradient(y, [x, gamma, beta], output_gradients=dy)

    def run(fn):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(x)
        out[0].numpy()
        return (time.perf_counter() - start) / iters * 1e3

    times = {ours: [], stock: []}
    for fn in times:
        run(fn)
    for _ in range(repeats):
        for fn in times:
            times[fn].append(run(fn))
    return statistics.median(times[ours]), statistics.median(times[stock])


def plot(path, history, errors, curves, momentum):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    epochs = np.arange(1, len(history.train) + 1)
    axes[0].plot(epochs, history.train, "o-", label="train")
    axes[0].plot(epochs, history.test, "s-", label="test")
    axes[0].set(title="Digits CNN, accuracy with training=False",
                xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    for warmup, style in ((True, "-"), (False, "--")):
        label = "warm-up (default)" if warmup else "plain EMA (warmup=False)"
        axes[1].plot(np.arange(1, len(errors[warmup]) + 1), errors[warmup],
                     style, label=label)
        steps, acc = zip(*curves[warmup])
        axes[2].plot(steps, acc, "o" + style, label=label)
    axes[1].set(title=f"Moving mean error, momentum {momentum}",
                xlabel="training step", ylabel="mean |moving mean - data mean|",
                yscale="log")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    axes[2].set(title=f"Test accuracy (training=False), momentum {momentum}",
                xlabel="training step", ylabel="accuracy", ylim=(0, 1.02))
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out", help="output folder")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true",
                        help="a few epochs and steps, for tests")
    args = parser.parse_args(argv)
    quick = args.quick
    epochs = 2 if quick else args.epochs
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    data = load_digits()
    x_train, y_train, x_test, y_test = data
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 8x8")

    model, history = train(data, epochs)
    train_acc, test_acc = history.train[-1], history.test[-1]
    print(f"accuracy with training=False: train {train_acc:.4f}, "
          f"test {test_acc:.4f}")

    path, same = save_and_reload(model, args.out, x_test)
    print(f"saved {path}; reloaded predictions identical: {same}")
    if not same:
        raise SystemExit("reloaded model predicts differently")

    momentum = 0.999
    print(f"cold start at momentum {momentum}: warm-up vs plain EMA ...")
    errors = moving_stat_error(x_train, momentum, 40 if quick else 300)
    curves = cold_start(data, momentum, 10 if quick else 50, 5)
    for warmup in (True, False):
        name = "warm-up   " if warmup else "plain EMA "
        print(f"  {name} moving-mean error after {len(errors[warmup])} steps "
              f"{errors[warmup][-1]:.4f}, test accuracy after "
              f"{curves[warmup][-1][0]} steps {curves[warmup][-1][1]:.4f}")
    png = os.path.join(args.out, "demo.png")
    plot(png, history, errors, curves, momentum)
    print(f"wrote {png}")

    shape = (8, 28, 28, 64) if quick else (32, 56, 56, 64)
    ours, stock = time_training_step(shape, repeats=3 if quick else 9)
    print(f"CPU training step (forward+backward+moving update), "
          f"{'x'.join(map(str, shape))} float32, median of interleaved runs: "
          f"fused_bn {ours:.2f} ms, tf.compat.v1.nn.fused_batch_norm "
          f"{stock:.2f} ms ({stock / ours:.2f}x)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
