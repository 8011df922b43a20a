"""dualgraph: provable robustness certificates via dual networks (Wong et al., 2018)."""

from .dual_registry import register_dual, register_relaxation
from .errors import DualgraphError, UnsupportedOpError
from .interpreter import EVAL_RULES, Interpreter, infer_shapes, register_eval, run_graph
from .ir import BATCH, Graph, Node, Value, check_graph

__version__ = "0.1.0"

__all__ = [
    "BATCH", "DualgraphError", "EVAL_RULES", "Graph", "Interpreter", "Node", "UnsupportedOpError",
    "Value", "check_graph", "infer_shapes", "register_dual", "register_eval", "register_relaxation", "run_graph",
]
