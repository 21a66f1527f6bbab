"""Serving artefacts load and run where fused_bn cannot be imported.

One fresh Python process (`import fused_bn` raises ImportError there, and
no FusedBn op is registered) runs all of them on the same input:
- `strip(model).export(path)`, served through `tf.saved_model.load(path).serve`;
- a TFLite flatbuffer of `strip(model)`, run in `tf.lite.Interpreter`;
- `.keras` files of `strip(model)` and `strip(model, fold=True)`;
- the frozen TF1 GraphDef of `fused_bn.compat.v1.inference_graph_def`,
  imported into a `tf.compat.v1.Session`.
Each is compared with the original model's (session's) inference output.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import fused_bn
from fused_bn.export import strip
from test_export import cnn, images, infer
from test_inference_graph import OUTPUTS, build_graph, sample

FRESH_PROCESS = r'''
import sys
sys.modules["fused_bn"] = None  # `import fused_bn` raises ImportError
import numpy as np
import tensorflow as tf
import keras
from tensorflow.python.framework import op_def_registry

folder = sys.argv[1]
x = np.load(f"{folder}/x.npy")
out = {}
saved_model = tf.saved_model.load(f"{folder}/saved_model")
out["saved_model"] = saved_model.serve(x).numpy()

interpreter = tf.lite.Interpreter(model_path=f"{folder}/model.tflite")
[inp], [outp] = interpreter.get_input_details(), interpreter.get_output_details()
interpreter.resize_tensor_input(inp["index"], x.shape)
interpreter.allocate_tensors()
interpreter.set_tensor(inp["index"], x)
interpreter.invoke()
out["tflite"] = interpreter.get_tensor(outp["index"])

for name in ("stripped", "folded"):
    model = keras.models.load_model(f"{folder}/{name}.keras")
    out[name + ".keras"] = model.predict(x, verbose=0)

graph_def = tf.compat.v1.GraphDef()
with open(f"{folder}/frozen.pb", "rb") as f:
    graph_def.ParseFromString(f.read())
names = sys.argv[2].split(",")
with tf.Graph().as_default() as graph:
    tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        results = sess.run([n + ":0" for n in names],
                           {"x:0": np.load(f"{folder}/x_tf1.npy")})
out.update({"frozen/" + n: r for n, r in zip(names, results)})

assert op_def_registry.get("FusedBn>Forward") is None, "the op library was loaded"
try:
    import fused_bn
except ImportError:
    out["fused_bn_importable"] = np.array(False)
np.savez(f"{folder}/out.npz", **out)
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(outputs of the fresh process, the expected outputs)."""
    folder = tmp_path_factory.mktemp("artifacts")
    model = cnn()
    x = images(model.input_shape[1:])
    np.save(folder / "x.npy", x)
    want = {"model": infer(model, x)}
    stripped = strip(model)
    stripped.export(str(folder / "saved_model"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
    (folder / "model.tflite").write_bytes(converter.convert())
    stripped.save(folder / "stripped.keras")
    strip(model, fold=True).save(folder / "folded.keras")

    graph, sess, x_tf1, training = build_graph()
    data = sample()
    np.save(folder / "x_tf1.npy", data)
    want.update(zip(OUTPUTS, sess.run([n + ":0" for n in OUTPUTS],
                                      {x_tf1: data, training: False})))
    graph_def = fused_bn.compat.v1.inference_graph_def(sess, OUTPUTS)
    sess.close()
    (folder / "frozen.pb").write_bytes(graph_def.SerializeToString())

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), ",".join(OUTPUTS)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(np.load(folder / "out.npz")), want


def test_fused_bn_was_not_importable(served):
    got, _ = served
    assert not got["fused_bn_importable"]


@pytest.mark.parametrize("artifact", ["saved_model", "stripped.keras"])
def test_stripped_model_artifacts(served, artifact):
    got, want = served
    np.testing.assert_allclose(got[artifact], want["model"], rtol=1e-5, atol=1e-5)


def test_folded_keras_file(served):
    got, want = served
    np.testing.assert_allclose(got["folded.keras"], want["model"], rtol=1e-4, atol=1e-4)


def test_tflite(served):
    got, want = served
    np.testing.assert_allclose(got["tflite"], want["model"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", OUTPUTS)
def test_frozen_tf1_graph(served, name):
    got, want = served
    tol = 1e-2 if name == "half" else 1e-5
    np.testing.assert_allclose(got["frozen/" + name], want[name], rtol=tol, atol=tol)
