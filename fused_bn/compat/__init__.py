"""TF1-style helpers: fused_bn.compat.v1.batch_norm."""
from . import v1

__all__ = ["v1"]
