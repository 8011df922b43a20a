"""Branch and bound over ReLU splits against an exact MILP (scipy's HiGHS, :mod:`milp_oracle`).

On small random ReLU networks (MLPs, residual and dense DAGs) and properties drawn close to
the exact optimum (down to 0.1% of the output's spread), ``verify`` with input splitting
off (so that unsat can only come from the bounds or from ReLU splits):

* never answers ``unsat`` where the MILP finds a violation, nor ``sat`` where it proves the
  property (and every ``sat`` point is a real violation);
* answers ``unsat`` wherever the MILP proves a property whose conjunctions have one row each
  (robustness margins, half-spaces, unions of them), within the time limit: branch and bound
  is complete there (every crossing unit can be split, and a domain with all of them split is
  bounded exactly once its split multipliers are optimal). A conjunction of several rows is
  proved empty through one of its rows or their mean, which need not suffice on a domain where
  only the rows together are infeasible: there ``unknown`` is allowed (never a wrong answer);
* without a PGD round, any ``sat`` comes from a domain's minimising corner and is real.

(``tests/test_verify.py`` shows a property only the splits prove: two ReLUs that cancel.)
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings

from dualgraph.verification import VerifyConfig, VerifyModel, verify_property
from dualgraph.vnnlib import read_vnnlib

from milp_oracle import forward64, nets_and_properties, write_instance

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
RELU_SPLITS_ONLY = VerifyConfig(split_max_inputs=0, attack_rounds=0)


def answer(net, prop, folder, config: VerifyConfig = RELU_SPLITS_ONLY):
    onnx_path, vnnlib_path = write_instance(net, prop, folder)
    return verify_property(VerifyModel(onnx_path), read_vnnlib(vnnlib_path), 30, config)


@settings(max_examples=60, **SETTINGS)
@given(pair=nets_and_properties())
def test_branch_and_bound_agrees_with_the_milp(pair, tmp_path_factory):
    net, prop = pair
    result = answer(net, prop, tmp_path_factory.mktemp("bab"))
    assert result.answer in ("sat", "unsat", "unknown"), (result.answer, result.details, prop)
    single_rows = all(len(c.d) == 1 for c in prop.unsafe)
    if prop.expected == "unsat" and single_rows:
        assert result.answer == "unsat", (result.details, prop)
    elif prop.expected == "unsat":  # see the module docstring: proved through single rows and their mean
        assert result.answer in ("unsat", "unknown"), (result.details, prop)
    else:
        assert result.answer != "unsat", (result.details, prop)
    if result.answer == "sat":
        x = np.asarray(result.x, dtype=np.float64)
        assert (prop.input_lo <= x).all() and (x <= prop.input_hi).all()
        assert prop.unsafe_at(forward64(net, x[None]), 1e-9)[0]
