"""The seeds' cold start: at momentum 0.999, 50 steps leave plain-EMA moving
statistics near their initial values, so inference accuracy collapses; with
warm-up they are the running average of the batches seen and it does not."""
import keras
import numpy as np
import pytest

import fused_bn

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def inference_accuracy_after_50_steps(warmup, seed=0):
    digits = sklearn_datasets.load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    order = np.random.RandomState(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        fused_bn.BatchNormalization(momentum=0.999, warmup=warmup),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        fused_bn.BatchNormalization(momentum=0.999, warmup=warmup),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", use_bias=False),
        fused_bn.BatchNormalization(momentum=0.999, warmup=warmup),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(seed)
    for _ in range(50):
        idx = rng.choice(train, 32)
        model.train_on_batch(x[idx], y[idx])
    logits = model.predict(x[test], verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y[test]))


@pytest.mark.parametrize("seed", [0, 1])
def test_warmup_removes_the_cold_start(seed):
    with_warmup = inference_accuracy_after_50_steps(True, seed)
    without = inference_accuracy_after_50_steps(False, seed)
    assert with_warmup > 0.7, with_warmup
    assert without < 0.4, without
