"""An example dualgraph plugin package: see :mod:`dualgraph_example_ops.softplus`."""

from .softplus import DOMAIN, Softplus

__all__ = ["DOMAIN", "Softplus"]
