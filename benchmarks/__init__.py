"""Benchmarks of fused_bn against TensorFlow's and Keras' batch norms.

    python -m benchmarks.run --device cpu --out benchmarks/results
"""
