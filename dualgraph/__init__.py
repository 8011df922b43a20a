"""dualgraph: provable robustness certificates via dual networks (Wong et al., 2018).

The public plugin API (README "Writing a dual layer"): :func:`define_op` returns an
:class:`OpDefinition` on which an op's evaluation, dual layer (:class:`DualRule`,
:class:`AffineRule`, or a :class:`Relaxation` through ``definition.relaxation``), ONNX
import and torch.fx lowering are declared together; :func:`var` and :func:`random_const`
describe the example nodes :func:`dualgraph.testing.check_op` checks it on.
"""

from .dual_registry import AffineRule, Bounds, DualRule, DualStep, FreeLines, Relaxation
from .errors import DualgraphError, UnsupportedOpError
from .interpreter import Interpreter, infer_shapes, run_graph
from .ir import BATCH, Graph, Node, Value, check_graph
from .op_registry import SAME, OpDefinition, define_op, random_const, var

__version__ = "0.1.0"

__all__ = [
    "AffineRule", "BATCH", "Bounds", "DualRule", "DualStep", "DualgraphError", "FreeLines", "Graph", "Interpreter", "Node",
    "OpDefinition", "Relaxation", "SAME", "UnsupportedOpError", "Value", "check_graph", "define_op",
    "infer_shapes", "random_const", "run_graph", "var",
]
