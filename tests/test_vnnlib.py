"""Tests of the VNN-LIB 1.0 reader: real benchmark files, every syntax form, DNF, errors, speed."""

from __future__ import annotations

import gc
import re
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph.errors import DualgraphError
from dualgraph.vnnlib import Conjunction, format_counterexample, parse_vnnlib, read_vnnlib

BENCH = Path(__file__).resolve().parents[2] / "shared" / "vnncomp2021"
BENCH_FILES = sorted(BENCH.rglob("*.vnnlib")) if BENCH.is_dir() else []

HEADER = "".join(f"(declare-const {v} Real)\n" for v in ("X_0", "X_1", "Y_0", "Y_1"))  # lines 1-4
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"  # 5-8


def bench(name: str) -> Path:
    if not BENCH.is_dir():
        pytest.skip(f"../shared/vnncomp2021 not found (looked in {BENCH}); benchmark files are not available")
    return BENCH / name


def one(text: str):
    props = parse_vnnlib(text)
    assert len(props) == 1
    return props[0]


# ------------------------------------------------------------------ real benchmark files


@pytest.mark.parametrize("path", BENCH_FILES or [None], ids=lambda p: p.name if p else "none")
def test_every_benchmark_file_parses(path: Path | None) -> None:
    if path is None:
        pytest.skip(f"../shared/vnncomp2021 not found (looked in {BENCH}); benchmark files are not available")
    props = read_vnnlib(path)
    n_x = len(set(re.findall(r"declare-const X_(\d+)", path.read_text())))
    assert len(props) == 1
    for p in props:
        assert p.n_inputs == n_x and p.input_lo.dtype == np.float64
        assert np.all(np.isfinite(p.input_lo)) and np.all(p.input_lo <= p.input_hi)
        assert len(p.unsafe) >= 1 and all(c.C.shape[1] == p.n_outputs for c in p.unsafe)


def test_mnistfc_prop_0_003() -> None:
    (p,) = read_vnnlib(bench("mnistfc/prop_0_0.03.vnnlib"))  # "Mnist property with label: 8."
    assert p.n_inputs == 784 and p.n_outputs == 10
    width = p.input_hi - p.input_lo
    assert np.all(width <= 0.06 + 1e-6) and np.all(width > 0)
    assert p.input_lo.min() >= 0.0 and p.input_hi.max() <= 1.0
    assert p.input_hi[0] == 0.029999999329447746 and p.input_lo[0] == 0.0
    others = [j for j in range(10) if j != 8]
    assert len(p.unsafe) == 9
    for j, conj in zip(others, p.unsafe):  # (>= Y_j Y_8): Y_8 - Y_j <= 0
        expected = np.zeros((1, 10))
        expected[0, 8], expected[0, j] = 1.0, -1.0
        np.testing.assert_array_equal(conj.C, expected)
        np.testing.assert_array_equal(conj.d, [0.0])


def test_acas_property_3() -> None:
    (p,) = read_vnnlib(bench("test/test_prop.vnnlib"))
    lo = ["-0.30353115613746867", "-0.009549296585513092", "0.4933803235848431", "0.3", "0.3"]
    hi = ["-0.29855281193475053", "0.009549296585513092", "0.49999999998567607", "0.5", "0.5"]
    np.testing.assert_array_equal(p.input_lo, [float(t) for t in lo])  # the nearest float64 numbers
    np.testing.assert_array_equal(p.input_hi, [float(t) for t in hi])
    assert p.open_lo is None and p.open_hi is None
    (conj,) = p.unsafe  # COC (Y_0) is minimal: Y_0 - Y_j <= 0 for j = 1..4
    np.testing.assert_array_equal(conj.C, np.hstack([np.ones((4, 1)), -np.eye(4)]))
    np.testing.assert_array_equal(conj.d, np.zeros(4))


@pytest.mark.parametrize("name, C, d", [("test_small", -1.0, -100.0), ("test_tiny", -1.0, -100.0), ("test_nano", 1.0, -1.0)])
def test_tiny_files(name: str, C: float, d: float) -> None:
    (p,) = read_vnnlib(bench(f"test/{name}.vnnlib"))  # inputs and outputs in one `or` term
    np.testing.assert_array_equal(p.input_lo, [-1.0])
    np.testing.assert_array_equal(p.input_hi, [1.0])
    np.testing.assert_array_equal(p.unsafe[0].C, [[C]])
    np.testing.assert_array_equal(p.unsafe[0].d, [d])


# ------------------------------------------------------------------ syntax forms


def test_bound_forms_and_tightest_bound_wins() -> None:
    text = HEADER + (
        "; a comment with (parentheses\n(declare-const\n  X_2 Real) ; declared over two lines\n"
        "(assert (<= 0.5 X_0)) (assert (>= 0.75 X_0)) ; two on a line: the general parser\n"
        "(assert (and (>= X_1 -2) (<= X_1 2) (<= X_1 1.5)))\n"
        "(assert (>= X_0 0.25))\n"  # looser than 0.5: ignored
        "(assert (< Y_0 Y_1))\r\n"
    )
    text += "(assert (and (<= X_2 3) (<= 1\n X_2)))\n"  # a comparison over two lines: the general parser
    p = one(text)
    np.testing.assert_array_equal(p.input_lo, [0.5, -2.0, 1.0])
    np.testing.assert_array_equal(p.input_hi, [0.75, 1.5, 3.0])
    np.testing.assert_array_equal(p.unsafe[0].C, [[1.0, -1.0]])


def test_linear_terms() -> None:
    text = HEADER + BOX + (
        "(assert (<= (+ Y_0 (* 2 Y_1)) 3))\n"
        "(assert (>= (- Y_0 Y_1 1) (* 0.5 2 Y_1)))\n"  # Y_0 - Y_1 - 1 >= Y_1 -> -Y_0 + 2 Y_1 <= -1
        "(assert (<= (- Y_0) (- 4)))\n"  # -Y_0 <= -4
        "(assert (= Y_1 (+ 1 1)))\n"  # Y_1 <= 2 and -Y_1 <= -2
        "(assert (<= 1 2))\n"  # constantly true: no row
    )
    (conj,) = one(text).unsafe
    np.testing.assert_allclose(conj.C, [[1, 2], [-1, 2], [-1, 0], [0, 1], [0, -1]])
    np.testing.assert_allclose(conj.d, [3, -1, -4, 2, -2])


def test_constant_false_assert_gives_no_property() -> None:
    assert parse_vnnlib(HEADER + BOX + "(assert (<= 2 1))\n") == []


def test_input_disjunction_gives_one_property_per_box() -> None:
    text = HEADER + (
        "(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))\n"
        "            (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1))))\n"
        "(assert (or (<= Y_0 0) (>= Y_1 5)))\n"
    )
    props = parse_vnnlib(text)
    assert [p.input_lo.tolist() for p in props] == [[0, 0], [2, 0]]
    assert [p.input_hi.tolist() for p in props] == [[1, 1], [3, 1]]
    for p in props:
        assert [c.C.tolist() for c in p.unsafe] == [[[1, 0]], [[0, -1]]]
        assert [c.d.tolist() for c in p.unsafe] == [[0], [-5]]


def test_same_box_in_every_term_is_one_property() -> None:  # the VNN-COMP 2022 style
    text = HEADER + (
        "(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 Y_1))\n"
        "            (and (<= X_1 1) (>= X_1 0) (<= X_0 1) (>= X_0 0) (<= Y_0 -3))))\n"
    )
    p = one(text)
    assert [c.C.tolist() for c in p.unsafe] == [[[1, -1]], [[1, 0]]]


def test_whole_output_space_unsafe() -> None:
    p = one(HEADER + BOX)  # no output assert: every input is a counterexample
    (conj,) = p.unsafe
    assert conj.C.shape == (0, 2) and conj.holds([1e9, -1e9]) and p.violations([[0.0, 0.0]]).tolist() == [[-np.inf]]


def test_results_are_read_only_and_violations() -> None:
    p = one(HEADER + BOX + "(assert (or (and (<= Y_0 0) (<= Y_1 0)) (>= Y_0 10)))\n")
    with pytest.raises(ValueError):
        p.input_lo[0] = 5.0
    with pytest.raises(ValueError):
        p.unsafe[0].C[0, 0] = 5.0
    ys = np.array([[-1.0, -2.0], [1.0, -2.0], [11.0, 0.0]])
    np.testing.assert_array_equal(p.unsafe[0].violations(ys), [-1.0, 1.0, 11.0])
    np.testing.assert_array_equal(p.unsafe[1].violations(ys), [11.0, 9.0, -1.0])
    np.testing.assert_array_equal(p.violations(ys), [[-1.0, 11.0], [1.0, 9.0], [11.0, -1.0]])
    assert p.unsafe[0].holds(ys[0]) and not p.unsafe[0].holds(ys[1]) and p.unsafe[0].holds(ys[1], tol=1.0)


# ------------------------------------------------------------------ DNF against brute force

N_OUT = 3


@st.composite
def atoms(draw):
    op = draw(st.sampled_from(["<=", ">=", "<", ">"]))
    j = draw(st.integers(0, N_OUT - 1))
    c = draw(st.integers(-4, 4)) + draw(st.sampled_from([0.0, 0.5]))  # ties with the integer sample points, or none
    kind = draw(st.sampled_from(["var-const", "const-var", "var-var", "linear"]))
    if kind == "var-const":
        return f"({op} Y_{j} {c})", (op, {j: 1.0}, c)
    if kind == "const-var":
        return f"({op} {c} Y_{j})", ({"<=": ">=", ">=": "<=", "<": ">", ">": "<"}[op], {j: 1.0}, c)
    k = draw(st.integers(0, N_OUT - 1).filter(lambda k: k != j))
    if kind == "var-var":
        return f"({op} Y_{j} Y_{k})", (op, {j: 1.0, k: -1.0}, 0.0)
    a, b = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
    return f"({op} (+ (* {a} Y_{j}) (- (* {b} Y_{k})) {c}) 0)", (op, {j: float(a), k: float(-b)}, -c)


def formulas():
    def combine(children):
        return st.tuples(st.sampled_from(["and", "or"]), st.lists(children, min_size=1, max_size=3)).map(
            lambda t: (f"({t[0]} " + " ".join(c[0] for c in t[1]) + ")", (t[0], [c[1] for c in t[1]]))
        )

    return st.recursive(atoms(), combine, max_leaves=8)


def evaluate(f, y: np.ndarray) -> bool:
    if f[0] in ("and", "or"):
        vals = [evaluate(g, y) for g in f[1]]
        return all(vals) if f[0] == "and" else any(vals)
    op, coefs, c = f
    lhs = sum(a * y[j] for j, a in coefs.items())
    return {"<=": lhs <= c, ">=": lhs >= c, "<": lhs < c, ">": lhs > c}[op]


@settings(max_examples=150, deadline=None)
@given(st.lists(formulas(), min_size=1, max_size=3), st.integers(0, 2**32 - 1))
def test_dnf_matches_brute_force(asserts, seed: int) -> None:
    text = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n(declare-const Y_2 Real)\n"
    text += "(assert (>= X_0 0))\n(assert (<= X_0 1))\n" + "".join(f"(assert {a[0]})\n" for a in asserts)
    props = parse_vnnlib(text)
    ys = np.random.default_rng(seed).integers(-6, 7, size=(64, N_OUT)).astype(np.float64)
    for y in ys:
        truth = all(evaluate(a[1], y) for a in asserts)
        got = bool(props) and bool(props[0].violations(y).min() <= 0)
        assert got == truth, (text, y)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-5, 5), st.integers(0, 5)), min_size=8, max_size=8),
       st.lists(st.sampled_from([" ", "\n", "  \n ", "\t"]), min_size=12, max_size=12))
def test_fast_and_general_paths_agree(bounds, spaces) -> None:
    """One-line bounds (regex fast path) == the same bounds inside an `and` on odd lines."""
    decl = "".join(f"(declare-const X_{i} Real)\n" for i in range(4)) + "(declare-const Y_0 Real)\n"
    pairs = [(f"X_{i}", lo, lo + w) for i, lo, w in bounds] + [(f"X_{i}", -9, 9) for i in range(4)]
    lines = "".join(f"(assert (>= {x} {lo}))\n(assert (>= {hi} {x}))\n" for x, lo, hi in pairs)
    sp = [(spaces[k % 12], spaces[(k + 1) % 12]) for k in range(len(pairs))]  # newlines defeat the fast path
    nested = "(assert (and" + "".join(f"{s}(<= {lo} {x}){t}(<= {x}{s}{hi})" for (x, lo, hi), (s, t) in zip(pairs, sp)) + "))\n"
    out = "(assert (<= Y_0 0))\n"
    fast = parse_vnnlib(decl + lines + out)
    slow = parse_vnnlib(decl + nested + out)
    if not fast:  # an empty box: a false disjunct on both paths
        assert slow == []
        return
    np.testing.assert_array_equal(fast[0].input_lo, slow[0].input_lo)
    np.testing.assert_array_equal(fast[0].input_hi, slow[0].input_hi)


# ------------------------------------------------------------------ errors

ERRORS = [
    (HEADER + BOX + "(assert (<= Y_0 1)))\n", r"<string>:9: unbalanced parentheses: unexpected '\)'"),
    (HEADER + BOX + "(assert (or (<= Y_0 1)\n (<= Y_1 2)\n", r"<string>:9: unbalanced parentheses: this '\(' is never closed"),
    (HEADER + BOX + "(assert (<= Y_2 1))\n", r"<string>:9: undeclared variable 'Y_2'"),
    (HEADER + BOX + "(assert (or (<= Y_0 1)\n (<= (+ Y_0 Y_7) 2)))\n", r"<string>:9: undeclared variable 'Y_7'"),
    (HEADER + BOX + "(assert (or (<= Y_0 1)\n (<= X_9 2)))\n", r"<string>:10: undeclared variable 'X_9'"),
    (HEADER + "(assert (<= X_5 1))\n", r"<string>:5: undeclared variable 'X_5'"),
    (HEADER + BOX + "(assert (<= Y_0 foo))\n", r"<string>:9: unknown symbol 'foo'"),
    (HEADER + "(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n", r"input X_0 has no finite lower bound"),
    (HEADER + "(assert (>= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n", r"input X_0 has no finite upper bound"),
    (HEADER + BOX + "(assert (<= X_0 Y_0))\n", r"<string>:9: mixed input/output constraints are not supported"),
    (HEADER + BOX + "(assert (<= (+ X_0 Y_0) 1))\n", r"<string>:9: mixed input/output constraints are not supported"),
    (HEADER + BOX + "(assert (<= (+ X_0 X_1) 1))\n", r"<string>:9: an input constraint must bound one X_i"),
    (HEADER + BOX + "(assert (<= (* Y_0 Y_1) 1))\n", r"<string>:9: non-linear term \(\* Y_0 Y_1\)"),
    (HEADER + BOX + "(assert (not (<= Y_0 1)))\n", r"<string>:9: unknown function symbol or arity in \(not"),
    (HEADER + BOX + "(assert (<= (/ Y_0 2) 1))\n", r"<string>:9: unknown function symbol '/'"),
    (HEADER + BOX + "(assert (<= Y_0))\n", r"<string>:9: unknown function symbol or arity"),
    (HEADER + BOX + "(define-fun f () Real 1.0)\n", r"<string>:9: unsupported command \(define-fun"),
    (HEADER + BOX + "(declare-const Z Real)\n", r"<string>:9: unsupported command \(declare-const Z Real\)"),
    (HEADER + BOX + "Y_0\n", r"<string>:9: unexpected 'Y_0' outside parentheses"),
    (HEADER + BOX + "(<= Y_0 1)\n", r"<string>:9: unexpected comparison outside parentheses"),
    (HEADER + BOX + "(assert (<= Y_@ 1))\n", r"<string>:9: unexpected character '@'"),
    ("(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)\n", r"X_1 is not declared"),
    ("(declare-const X_0 Real)\n(assert (<= X_0 1))\n", r"Y_0 is not declared"),
]


def test_a_disjunct_with_an_empty_box_is_false_and_the_others_count() -> None:
    text = HEADER + BOX + ("(assert (or (and (>= X_1 2) (<= Y_0 1))\n"     # X_1 in [2, 1]: no input
                           "            (and (<= X_0 0.5) (<= Y_1 3))))\n")
    (prop,) = parse_vnnlib(text)
    assert prop.input_hi[0] == 0.5 and prop.input_lo[1] == -1
    assert prop.violations(np.array([[9.0, 3.0]]))[0, 0] <= 0  # the kept disjunct: Y_1 <= 3
    assert parse_vnnlib(HEADER + BOX + "(assert (>= X_1 2))\n") == []  # every disjunct false: unsat


def test_equal_float64_bounds_of_an_interval_that_is_not_empty() -> None:
    """``(0.5, 0.50000000000000000001)`` rounds to ``[0.5, 0.5]`` with a strict side; it is not
    empty (a review: it was dropped, a wrong unsat); ``(0.5, 0.5)`` as written is."""
    body = "(assert (> X_0 0.5))\n(assert (< X_0 {}))\n(assert (<= Y_0 1))\n"
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
    (prop,) = parse_vnnlib(head + body.format("0.50000000000000000001"))
    assert prop.input_lo[0] == prop.input_hi[0] == 0.5
    assert parse_vnnlib(head + body.format("0.5")) == []


def test_disjuncts_with_one_float64_box_and_other_bounds_as_read() -> None:
    """Two disjuncts whose boxes round to the same float64 box were one property checked against
    the first's bounds (a review: 'sat' at X_0 = 0.1 for the second's Y_0 <= 1, whose box
    [0.10000000000000000002, 0.10000000000000000001] is empty as read); and which of two such
    disjuncts came first decided whether an empty one dropped the other."""
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
    empty_second = head + ("(assert (or (and (>= X_0 0.1) (<= X_0 0.1) (<= Y_0 -1))\n"
                           "            (and (>= X_0 0.10000000000000000002) (<= X_0 0.10000000000000000001) (<= Y_0 1))))\n")
    (prop,) = parse_vnnlib(empty_second)
    assert len(prop.unsafe) == 1 and prop.unsafe[0].d[0] == -1
    a, b = "(and (> X_0 0.5) (<= X_0 0.5) (>= Y_0 0.4))", "(and (> X_0 0.5) (<= X_0 0.50000000000000000001) (>= Y_0 0.4))"
    for first, second in ((a, b), (b, a)):
        (prop,) = parse_vnnlib(head + f"(assert (or {first}\n {second}))\n")
        assert len(prop.unsafe) == 1 and any(q == Fraction("0.50000000000000000001") for *_, q, _ in prop.exact_inputs)


def test_a_counterexample_is_checked_against_every_bound_as_read() -> None:
    """An input with a bound float64 cannot hold is checked as the decimal the file states, against
    each of its bounds, exact ones included (``X_0 >= 0.1`` and ``X_0 >= fl(0.1)``: 0.1 is out)."""
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
    (prop,) = parse_vnnlib(head + "(assert (>= X_0 0.1))\n(assert (<= X_0 1))\n(assert (<= Y_0 1))\n")
    assert prop.holds_exactly([0.1], [0.0])  # the file says 0.1: exactly the bound
    float_of_tenth = Decimal(0.1)  # 0.1000000000000000055511...: the float64 nearest 0.1, written out
    text = head + f"(assert (>= X_0 0.1))\n(assert (>= X_0 {float_of_tenth}))\n(assert (<= X_0 1))\n(assert (<= Y_0 1))\n"
    (prop,) = parse_vnnlib(text)
    assert not prop.holds_exactly([0.1], [0.0])  # 0.1 as the file states it is below the second bound
    assert prop.holds_exactly([np.nextafter(0.1, 1)], [0.0])


def test_a_product_of_disjunctions_past_the_limit_is_an_error() -> None:
    """18 asserts of two-way ors are 262,144 disjuncts: refused at once, not parsed for a minute
    past the deadline (a review)."""
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
    body = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n" + "".join(
        f"(assert (or (>= Y_0 {k}) (>= Y_1 {k})))\n" for k in range(18))
    start = time.perf_counter()
    with pytest.raises(DualgraphError, match="more than 100,000 disjuncts"):
        parse_vnnlib(head + body)
    assert time.perf_counter() - start < 10


def test_byte_order_mark_and_leading_zeros(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark is not part of the text; ``X_00`` is not ``X_0`` on any path (the
    one-line bound's fast path read it as ``X_0``, the general parser refused it)."""
    path = tmp_path / "bom.vnnlib"
    path.write_bytes("\ufeff".encode() + (HEADER + BOX + "(assert (<= Y_0 1))\n").encode())
    assert len(read_vnnlib(path)) == 1
    for text in (HEADER + BOX + "(assert (<= X_00 0.5))\n", HEADER + BOX + "(assert (<= X_00\n 0.5))\n"):
        with pytest.raises(DualgraphError, match="undeclared variable 'X_00'"):
            parse_vnnlib(text)


@pytest.mark.parametrize("text, message", ERRORS, ids=[m[:40] for _, m in ERRORS])
def test_errors(text: str, message: str) -> None:
    with pytest.raises(DualgraphError, match=message) as info:
        parse_vnnlib(text)
    assert "\n" not in str(info.value)  # one line, as the CLI prints it
    assert gc.isenabled()  # the parser pauses the cyclic GC; it must restore it on errors too


def test_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DualgraphError, match=r"cannot read VNN-LIB file .*missing\.vnnlib"):
        read_vnnlib(tmp_path / "missing.vnnlib")
    bad = tmp_path / "bad.vnnlib"
    bad.write_text(HEADER + BOX + "(assert (<= Y_0 Y_9))\n")
    with pytest.raises(DualgraphError, match=re.escape(f"{bad}:9: undeclared variable 'Y_9'")):
        read_vnnlib(bad)


# ------------------------------------------------------------------ speed and result format


def test_multi_megabyte_file_parses_fast() -> None:
    rng = np.random.default_rng(0)
    n_in, n_out, n_terms = 30_000, 10, 30_000
    centre = rng.random(n_in)
    parts = [f"(declare-const X_{i} Real)\n" for i in range(n_in)] + [f"(declare-const Y_{j} Real)\n" for j in range(n_out)]
    parts += [f"(assert (<= X_{i} {float(c + 0.03)!r}))\n(assert (>= X_{i} {float(c - 0.03)!r}))\n" for i, c in enumerate(centre)]
    parts.append("(assert (or\n")
    for t in range(n_terms):
        a, b = rng.integers(n_out, size=2)
        parts.append(f"  (and (>= Y_{a} Y_{(a + 1) % n_out}) (<= Y_{b} {float(rng.normal())!r}))\n")
    parts.append("  (and (<= (+ Y_0 (* 2.5 Y_1)) 1.5))\n))\n")
    text = "".join(parts)
    wall, cpu = time.perf_counter(), time.process_time()
    (p,) = parse_vnnlib(text)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\nparsed {len(text) / 1e6:.2f} MB ({n_in} inputs, {n_terms + 1} disjuncts) in {wall:.3f} s wall, {cpu:.3f} s CPU")
    assert p.n_inputs == n_in and len(p.unsafe) == n_terms + 1
    np.testing.assert_array_equal(p.input_hi, centre + 0.03)
    np.testing.assert_array_equal(p.unsafe[-1].C[0, :2], [1.0, 2.5])
    assert len(text) > 3e6 and cpu < 3.0  # typically well under 1 s; loose to avoid flakiness


def test_format_counterexample() -> None:
    torch = pytest.importorskip("torch")
    text = format_counterexample(torch.tensor([[0.1, -2.0]], dtype=torch.float64), np.array([1 / 3]))
    assert text == f"sat\n((X_0 0.1)\n (X_1 -2.0)\n (Y_0 {1 / 3!r}))\n"
    values = [float(v) for v in re.findall(r"\(\w+ ([^\s()]+)\)", text)]
    assert values == [0.1, -2.0, 1 / 3]  # repr precision: exact round trip


def test_conjunction_is_plain_data() -> None:
    c = Conjunction(np.array([[1.0, -1.0]]), np.array([0.5]))
    assert c.holds([1.0, 0.5]) and not c.holds([2.0, 0.5])
    np.testing.assert_array_equal(c.violations(np.array([[1.0, 0.5], [2.0, 0.5]])), [0.0, 1.0])


def test_strict_comparisons_are_kept_for_counterexamples() -> None:
    """Strict rows and bounds are read as closed for proofs, and remembered: a point on a
    strict row's boundary is outside the unsafe region, and the box knows its open ends."""
    (p,) = parse_vnnlib("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                        "(assert (> X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (< X_1 1))\n"
                        "(assert (<= X_1 1))\n(assert (< Y_0 2.5))")
    assert p.input_lo.tolist() == [0.0, 0.0] and p.input_hi.tolist() == [1.0, 1.0]
    assert p.open_lo.tolist() == [True, False] and p.open_hi.tolist() == [False, True]  # equal bounds: strict wins
    (c,) = p.unsafe
    assert c.strict.tolist() == [True]
    assert p.violations(np.array([[2.5], [np.nextafter(2.5, 0)]])).ravel().tolist()[0] > 0
    assert p.violations(np.array([[np.nextafter(2.5, 0)]])).item() <= 0
    (q,) = parse_vnnlib("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n"
                        "(assert (<= X_0 1))\n(assert (<= Y_0 2.5))")
    assert q.open_lo is None and q.open_hi is None and q.unsafe[0].strict is None
    assert not parse_vnnlib("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (> X_0 1))\n"
                            "(assert (<= X_0 1))\n(assert (<= Y_0 2.5))")  # an empty open interval: false


def test_numbers_are_combined_exactly_and_output_bounds_rounded_up() -> None:
    """``(+ Y_0 1e20) <= (+ 3 1e20)`` is ``Y_0 <= 3`` (float64 sums would make it ``Y_0 <= 0``:
    found by a review, a wrong ``unsat``); an output constant float64 cannot hold is rounded
    up and its row made strict, so a point on the rounded value is no counterexample (found by a
    review: ``Y_0 <= 1073741823.9999999999`` read as ``Y_0 <= 2^30``, a wrong ``sat``)."""
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 1))\n(assert (<= X_0 2))\n"
    (p,) = parse_vnnlib(head + "(assert (<= (+ Y_0 1e20) (+ 3 1e20)))")
    assert p.unsafe[0].d.tolist() == [3.0] and p.unsafe[0].strict is None
    (p,) = parse_vnnlib(head + "(assert (<= (+ X_0 1e20) (+ 3 1e20)))\n(assert (<= Y_0 0))")
    assert p.input_hi.tolist() == [2.0]
    (p,) = parse_vnnlib(head + "(assert (<= Y_0 1073741823.9999999999))")
    assert p.unsafe[0].d.tolist() == [2.0 ** 30] and p.unsafe[0].strict.tolist() == [True]
    assert p.violations(np.array([[2.0 ** 30]])).item() > 0  # on the rounded value: outside
    assert not p.holds_exactly([1.5], [2.0 ** 30]) and p.holds_exactly([1.5], [2.0 ** 30 - 128])
    (p,) = parse_vnnlib(head + "(assert (<= (* 0.1 Y_0) 1))")  # a rounded coefficient keeps its exact row
    assert p.unsafe[0].exact is not None and p.holds_exactly([1.5], [10.0]) and not p.holds_exactly([1.5], [10.000001])


@pytest.mark.parametrize("body", ["(assert (<= (+ Y_0 Y_1) 1e400))", "(assert (<= (+ Y_0 Y_1) -1e400))",
                                  "(assert (<= (* 2 X_0) 1e400))\n(assert (<= Y_0 1))", "(assert (>= Y_0 1e1000000))",
                                  "(assert (<= X_0 -1e400))\n(assert (<= Y_0 1))"])
def test_numbers_past_float64_are_read(body) -> None:
    """Bounds past float64's range are infinite or make the box empty; no traceback."""
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n(assert (>= X_0 -1))\n"
    for p in parse_vnnlib(head + "(assert (<= X_0 1))\n" + body):
        assert p.violations(np.zeros((1, 2))).shape == (1, len(p.unsafe))


def test_a_coefficient_float64_cannot_hold_is_refused() -> None:
    head = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 -1))\n(assert (<= X_0 1))\n"
    with pytest.raises(DualgraphError, match=r"coefficient 7e-324 .* scale the comparison"):
        parse_vnnlib(head + "(assert (<= (* 7e-324 Y_0) -1e-300))")
