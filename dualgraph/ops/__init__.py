"""The built-in ops, one module per family; each op is defined once, through the same
public API a plugin uses (:func:`dualgraph.define_op`, see :mod:`dualgraph.op_registry`).

Adding a built-in op touches its family module here (evaluation, dual layer, ONNX import,
torch.fx lowering and checker examples on consecutive lines) and the op table of the
network generator in ``tests/strategies.py``.
"""

from . import (activations, arithmetic, composites, elementwise, extrema, linear, normalization,  # noqa: F401
               pooling, readout, reductions, resize, shapes)  # (importing defines the ops)
