"""Saving and restoring models with fused_bn.BatchNormalization: .keras files,
tf.train.Checkpoint, and SavedModels served in a fresh Python process."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf

import fused_bn

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fused_bn.__file__)))


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = fused_bn.BatchNormalization(momentum=0.9, name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(seed=1):
    rng = np.random.RandomState(seed)
    return (rng.randn(48, 6, 6, 2) * 2 + 0.5).astype("float32"), rng.randint(0, 3, 48)


def trained_model():
    model = make_model()
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model


def assert_same_weights(a, b):
    assert [w.name for w in a.weights] == [w.name for w in b.weights]
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())


def test_keras_file_round_trip(tmp_path):
    model = trained_model()
    bn = model.get_layer("bn")
    assert int(bn.num_updates.numpy()) == 6
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("bn")) is fused_bn.BatchNormalization
    assert loaded.get_layer("bn").get_config() == bn.get_config()
    assert_same_weights(model, loaded)
    x, y = data(seed=2)
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  loaded.predict(x, verbose=0))
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert int(loaded.get_layer("bn").num_updates.numpy()) == 9
    assert_same_weights(model, loaded)


def test_checkpoint_restores_moving_stats_and_counter(tmp_path):
    model = trained_model()
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    fresh = make_model(seed=5)
    bn = fresh.get_layer("bn")
    assert int(bn.num_updates.numpy()) == 0
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    assert int(bn.num_updates.numpy()) == 6
    assert_same_weights(model, fresh)
    x, _ = data(seed=2)
    np.testing.assert_array_equal(model(x), fresh(x))


def run_python(code, cwd):
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_saved_model_serves_in_a_fresh_process(tmp_path):
    model = trained_model()
    x, _ = data(seed=3)
    export = str(tmp_path / "saved_model")
    tf.saved_model.save(model, export)
    np.save(tmp_path / "x.npy", x)
    serve = f"""
        import numpy as np
        import tensorflow as tf
        {{}}
        m = tf.saved_model.load({export!r})
        out = m.signatures["serving_default"](tf.constant(np.load("x.npy")))
        np.save("y.npy", list(out.values())[0].numpy())
        """
    done = run_python(serve.format("import fused_bn"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"),
                               model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    failed = run_python(serve.format(""), tmp_path)
    assert failed.returncode != 0
    assert "Op type not registered 'FusedBn>Forward'" in failed.stderr
