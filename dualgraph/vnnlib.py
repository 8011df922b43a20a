"""VNN-LIB 1.0 property reader (hand-written; the PyPI ``vnnlib`` package reads 2.0 only).

A file declares inputs ``X_0..X_{n-1}`` and outputs ``Y_0..Y_{m-1}`` (``declare-const``)
and asserts formulas built from ``and``/``or`` over linear comparisons (``<= >= < > =``
of terms with ``+ - *``). The conjunction of all asserts is put in disjunctive normal
form (an ``and`` of ``or``s is distributed into an ``or`` of ``and``s). Each DNF term is a
box on the inputs (an input comparison must bound one ``X_i`` by a constant) plus rows
``c^T y <= d`` on the outputs. Terms with the same box are grouped into one property:

    unsafe(y)  <=>  OR_m ( C_m @ y <= d_m )      (row-wise; a union of polyhedra)

The property *holds* (competition answer ``unsat``) iff no ``x`` in ``[input_lo, input_hi]``
has ``f(x)`` in the unsafe region. Proofs treat strict comparisons as non-strict: the closed
region contains the strict one, so proving the closed region unreachable is still sound. A
counterexample must satisfy them strictly: each output row and input bound remembers
whether it is strict (``Conjunction.strict``, ``VnnlibProperty.open_lo``/``open_hi``), a point
on the boundary of a strict row is not in the unsafe region (:meth:`Conjunction.violations`),
and a candidate on an open input bound is moved one step of the input precision inside
(:func:`dualgraph.falsify.cast_into_box`).

Numbers are read and combined exactly (:class:`fractions.Fraction`: ``(+ Y_0 1e20)`` against
``(+ 3 1e20)`` is ``Y_0 <= 3``), then rounded: an output row's ``d`` up for proofs, and where
float64 cannot hold it the row is strict at the rounded value (for float64 values ``y <= d`` is
``y < d_up``), so a counterexample still meets the exact row. Input bounds are rounded to the
nearest float64 number, and every bound of an input with a bound float64 does not hold is kept
as read (``VnnlibProperty.exact_inputs``). The model is fed each input rounded to the nearest
value of its input precision, as the competition's checker feeds a counterexample: a
counterexample is a point exactly in the box whose rounded value violates the property (a point
box at ``0.1`` holds no float value; see :meth:`dualgraph.falsify.Falsifier.confirm`), and a
proof covers every rounded value (:meth:`VnnlibProperty.fed_bounds`). The coefficients of an output row are rounded
to the nearest float64 number for proofs (a relative change below 2^-53, e.g. ``0.1``; integer
and dyadic ones are exact); a conjunction with such a coefficient keeps its exact rows
(``Conjunction.exact``), against which a counterexample is checked
(:meth:`VnnlibProperty.holds_exactly`).
"""

from __future__ import annotations

import gc
import itertools
import math
import re
from decimal import Decimal
from fractions import Fraction
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from dualgraph.errors import DualgraphError

_TOKEN = re.compile(r"[()\n@]|[^\s()@]+")  # "\n" is a token so lines are counted for free
_COMMENT = re.compile(r";[^\n]*")
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(_NUM + "$")
_VARIABLE = re.compile(r"([XY])_(\d+)$")
# Fast paths. A big file is mostly declarations, one-line input bounds and simple
# comparisons inside large disjunctions. Regexes find these in C: declarations and
# one-line bounds are blanked out, and each simple comparison `(op a b)` is replaced by
# "@" and converted directly; the tokenizer puts the converted atoms back in order. No
# replacement removes a newline, so line numbers of what remains do not move. Anything
# else (a comparison split over lines, nested terms) goes through the general parser.
_S, _S1 = r"[ \t\r]*", r"[ \t\r]+"
_DECL = re.compile(r"\(\s*declare-const\s+([XY]_\d+)\s+Real\s*\)")
_OTHER_DECL = re.compile(r"\(\s*declare-const\s+(\S+)\s+(?!Real\s*\))([^\s()]+)\s*\)")
_BOUND = re.compile(
    rf"^{_S}\(assert{_S}\({_S}(<=|>=){_S1}(?:X_(0|[1-9]\d*){_S1}({_NUM})|({_NUM}){_S1}X_(0|[1-9]\d*)){_S}\){_S}\){_S}$",
    re.M
)
_SIMPLE = re.compile(rf"\({_S}(<=|>=|<|>){_S1}([^\s()]+){_S1}([^\s()]+){_S}\)")
_IGNORED = {"set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"}

MAX_DISJUNCTS = 100_000
"""The most disjuncts the product of the asserts' disjunctions may have (each is bounded on its
own; 18 asserts of two-way ors already make 262,144)."""

Atom = tuple  # ("x", i, is_upper, bound, strict) or ("y", {j: coef}, d, strict): sum coef*Y_j <= d (< if strict)
Linear = tuple[dict[tuple[bool, int], Fraction], Fraction]  # ({(is_output, index): coef}, const), exact
Dnf = list[list[Atom]]  # a disjunction of terms, each a conjunction of atoms


@dataclass(frozen=True, eq=False)
class Conjunction:
    """The polyhedron ``{y : C @ y <= d}`` (``C``: ``k x n_outputs``, ``d``: ``k``), with
    ``C_r @ y < d_r`` on the rows where ``strict`` is set (None: no strict row).

    ``k == 0`` is the whole output space: every input in the box is a counterexample.
    """

    C: np.ndarray
    d: np.ndarray
    strict: np.ndarray | None = None
    #: the rows as read, ``({j: coefficient}, d, strict)`` in exact arithmetic, where a
    #: coefficient was rounded to form ``C`` (None: ``C`` is exact)
    exact: tuple | None = None

    def violations(self, y_batch: Any) -> np.ndarray:
        """``max_rows (C @ y - d)`` for each ``y`` of a ``[B, n_outputs]`` batch; ``<= 0``: inside.
        A strict row's value is moved up to the next number, so that it is ``<= 0`` only where
        ``C_r @ y - d_r < 0``."""
        y = np.asarray(y_batch, dtype=np.float64).reshape(-1, self.C.shape[1])
        v = y @ self.C.T - self.d
        if self.strict is not None and self.strict.any():
            v = np.where(self.strict, np.nextafter(v, np.inf), v)
        return np.max(v, axis=1, initial=-np.inf)

    def holds(self, y: Any, tol: float = 0.0) -> bool:
        """Whether ``C @ y <= d + tol`` for one output vector ``y``."""
        return bool(self.violations(y)[0] <= tol)


@dataclass(frozen=True, eq=False)
class VnnlibProperty:
    """One input box and the unsafe output region over it (the union of ``unsafe``)."""

    input_lo: np.ndarray
    input_hi: np.ndarray
    n_outputs: int
    unsafe: tuple[Conjunction, ...]
    #: the inputs whose lower (upper) bound is strict, ``X_i > lo_i``; None: none
    open_lo: np.ndarray | None = None
    open_hi: np.ndarray | None = None
    #: every bound of each input that has a bound float64 does not hold, as read:
    #: ``(i, is_upper, value: Fraction, strict)`` (the box has the nearest values); None: none
    exact_inputs: tuple | None = None

    @property
    def n_inputs(self) -> int:
        return int(self.input_lo.shape[0])

    def fed_bounds(self, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """A box (float64 arrays) holding every input of the box as the model is fed it: rounded
        to the nearest value of its input precision ``dtype`` (what onnxruntime is given for a
        counterexample, :meth:`dualgraph.falsify.Falsifier.confirm`). Nearest rounding is
        monotone, so ``[min(lo, fl(lo)), max(hi, fl(hi))]``; a proof over it covers both the box
        and its rounding (a bound such as ``0.2`` rounds to a float32 above it)."""
        lo, hi = self.input_lo, self.input_hi
        return (np.minimum(lo, lo.astype(dtype).astype(np.float64)),
                np.maximum(hi, hi.astype(dtype).astype(np.float64)))

    def violations(self, y_batch: Any) -> np.ndarray:
        """``[B, len(unsafe)]``: each conjunction's violation; ``y`` is unsafe iff its row's min is ``<= 0``."""
        y = np.asarray(y_batch, dtype=np.float64).reshape(-1, self.n_outputs)
        return np.stack([c.violations(y) for c in self.unsafe], axis=1) if self.unsafe else np.empty((len(y), 0))

    def holds_exactly(self, x: Any, y: Any) -> bool:
        """Whether the point ``x`` is in the box and ``y`` in an unsafe conjunction, in exact
        arithmetic on the stored numbers (what :meth:`violations` says up to its rounding).

        An input with a bound float64 does not hold (``X_0 = 0.1``) is checked as the decimal a
        counterexample file states for it (:func:`format_counterexample`: ``repr``, ``0.1``),
        against each of its bounds as read; the others as the float64 numbers they are."""
        xs = [Fraction(float(v)) for v in np.asarray(x, dtype=np.float64).ravel()]
        read = {i for i, *_ in self.exact_inputs or ()}
        for i in read:
            xs[i] = Fraction(repr(float(xs[i])))
        for i, is_upper, q, strict in self.exact_inputs or ():
            if (xs[i] > q if is_upper else xs[i] < q) or (strict and xs[i] == q):
                return False
        y = np.asarray(y, dtype=np.float64)
        if not np.isfinite(y).all():  # an infinite output (NaN: never unsafe): the float64 screen
            return bool((self.violations(y) <= 0).any())
        for i, v in enumerate(xs):
            if i in read:
                continue
            lo, hi = Fraction(float(self.input_lo[i])), Fraction(float(self.input_hi[i]))
            open_lo = self.open_lo is not None and bool(self.open_lo[i])
            open_hi = self.open_hi is not None and bool(self.open_hi[i])
            if v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi):
                return False
        ys = [Fraction(float(v)) for v in np.asarray(y, dtype=np.float64).ravel()]
        for c in self.unsafe:
            rows = c.exact or [({j: Fraction(float(a)) for j, a in enumerate(c.C[r]) if a != 0.0}, Fraction(float(c.d[r])),
                                c.strict is not None and bool(c.strict[r])) for r in range(len(c.d))]
            if all((lhs := sum((a * ys[j] for j, a in coefs.items()), Fraction(0))) < d or (lhs == d and not strict)
                   for coefs, d, strict in rows):
                return True
        return False


def read_vnnlib(path: str | Path) -> list[VnnlibProperty]:
    """Read a VNN-LIB 1.0 file (``.vnnlib.gz`` too): one :class:`VnnlibProperty` per distinct input box."""
    from .files import read_text
    return parse_vnnlib(read_text(path, "VNN-LIB file"), source=str(path))


def parse_vnnlib(text: str, source: str = "<string>") -> list[VnnlibProperty]:
    """Parse VNN-LIB 1.0 text, one property per input box (``[]``: the asserts are unsatisfiable).

    A disjunct whose input box is empty (some lower bound above its upper bound) is false
    and left out; the other disjuncts are kept."""
    # The parser makes millions of small containers and no reference cycles; the cyclic
    # GC would rescan them again and again (10x slower on multi-MB files), so pause it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse(text, source)
    finally:
        if gc_was_enabled:
            gc.enable()


def _parse(text: str, source: str) -> list[VnnlibProperty]:
    text = _COMMENT.sub("", text)
    if "@" in text:  # "@" is the placeholder of the fast path below
        _fail(source, _line_at(text, text.index("@")), "unexpected character '@'")
    other = _OTHER_DECL.search(text)
    if other:
        _fail(source, _line_at(text, other.start()), f"(declare-const {other[1]} {other[2]}): only Real "
                                                      "variables X_i and Y_i are supported; declare it Real")
    names = {n: (n[0] == "Y", int(n[2:])) for n in _DECL.findall(text)}
    if not names:
        _fail(source, None, "no variables declared; a property declares its inputs and outputs with "
                            "(declare-const X_0 Real) ... (declare-const Y_0 Real) ...")
    stripped = _DECL.sub("", text)
    if stripped.count("\n") != text.count("\n"):  # a declaration over several lines: keep its newlines
        stripped = _DECL.sub(lambda m: "\n" * m[0].count("\n"), text)
    text = stripped
    n_in, n_out = _count(names, False, source), _count(names, True, source)
    top = _BOUND.findall(text)
    base_lo, base_hi, base_open_lo, base_open_hi = _top_bounds(top, n_in, text, source)
    top_atoms = [("x", int(b[1] or b[4]), (b[0] == "<=") == bool(b[1]), Decimal(b[2] or b[3]), False) for b in top]
    text = _BOUND.sub("", text)
    reader = _Reader(names, source)
    text, atoms = reader.simple_atoms(text)
    forms, lines = _parse_sexprs(text, source, iter(atoms))
    asserts = []
    for form, line in zip(forms, lines):
        if form[:1] == ["assert"] and len(form) == 2:
            asserts.append((form[1], line))
        elif not (form and isinstance(form[0], str) and form[0] in _IGNORED):
            _fail(source, line, f"unsupported command {_show(form)}; expected (declare-const X_i Real) or (assert formula)")
    common, terms = _conjoin([reader.dnf(e, line) for e, line in asserts])
    if terms is None:
        return []
    for i, (l, h, lo_open, hi_open) in _narrow(common, base_lo, base_hi, base_open_lo, base_open_hi).items():
        base_lo[i], base_hi[i], base_open_lo[i], base_open_hi[i] = l, h, lo_open, hi_open
    common_rows = [a for a in common if a[0] == "y"]
    conjunctions = _conjunctions([common_rows + [a for a in t if a[0] == "y"] for t in terms], n_out)
    shared = _InputBounds(top_atoms + common)
    groups: dict[tuple, list[Conjunction]] = {}
    term_of: dict[tuple, list[Atom]] = {}
    for term, conj in zip(terms, conjunctions):
        # Key a term's box by where it differs from the common box: hashing whole
        # arrays would cost O(n_inputs) for each of possibly thousands of disjuncts. Two
        # boxes with the same float64 bounds are one only if their bounds as read agree too
        # (else a counterexample would be checked against the other's box: a review).
        key = (tuple(sorted(_narrow(term, base_lo, base_hi, base_open_lo, base_open_hi).items())),
               shared.own_bounds_as_read(term))
        if key not in groups:
            term_of[key] = term
        groups.setdefault(key, []).append(conj)
    props = []
    for key, unsafe in groups.items():
        lo, hi, open_lo, open_hi = base_lo.copy(), base_hi.copy(), base_open_lo.copy(), base_open_hi.copy()
        for i, (l, h, lo_open, hi_open) in key[0]:
            lo[i], hi[i], open_lo[i], open_hi[i] = l, h, lo_open, hi_open
        # no input satisfies this disjunct: it is false, the others still count (equal float64
        # bounds with a strict one are empty only where both are the numbers as written: the
        # interval (0.5, 0.50000000000000000001) is not empty)
        exact = shared.as_read(term_of[key])
        rounded = np.zeros(len(lo), dtype=bool)
        rounded[[a[0] for a in exact]] = True
        if (lo > hi).any() or ((lo == hi) & (open_lo | open_hi) & ~rounded).any() or _empty_as_read(exact):
            continue
        for arr, what, op in ((lo, "lower", ">="), (hi, "upper", "<=")):
            if not np.isfinite(arr).all():
                i = int(np.argmin(np.isfinite(arr)))
                _fail(source, None, f"input X_{i} has no finite {what} bound; add (assert ({op} X_{i} c)) "
                                    "with a finite number c")
        props.append(VnnlibProperty(_frozen(lo), _frozen(hi), n_out, tuple(unsafe),
                                    _frozen(open_lo) if open_lo.any() else None,
                                    _frozen(open_hi) if open_hi.any() else None,
                                    exact or None))
    return props


def format_counterexample(x: Any, y: Any) -> str:
    """The VNN-COMP result text of a counterexample: ``sat`` then ``((X_0 v)\\n (X_1 v) ... (Y_0 v) ...)``."""
    xs, ys = (np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, np.float64).ravel() for a in (x, y))
    items = [f"(X_{i} {float(v)!r})" for i, v in enumerate(xs)] + [f"(Y_{j} {float(v)!r})" for j, v in enumerate(ys)]
    return "sat\n(" + "\n ".join(items) + ")\n"


def _fail(source: str, line: int | None, msg: str) -> NoReturn:
    raise DualgraphError(f"{source}:{line}: {msg}" if line is not None else f"{source}: {msg}")


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


class _InputBounds:
    """The input bounds every disjunct shares, by input, and which inputs have one that float64
    does not hold exactly (found once: a file may bound 784 inputs for thousands of disjuncts)."""

    def __init__(self, atoms: list[Atom]) -> None:
        self.by_input: dict[int, list[Atom]] = {}
        for a in atoms:
            if a[0] == "x":
                self.by_input.setdefault(a[1], []).append(a)
        self.inexact = {i for i, bounds in self.by_input.items() if any(map(_inexact, bounds))}

    def own_bounds_as_read(self, term: list[Atom]) -> tuple:
        """The bounds of ``term`` itself, as read, on the inputs :meth:`as_read` keeps exactly."""
        return tuple(sorted((a[1], a[2], Fraction(a[3]), bool(a[4])) for a in term
                            if a[0] == "x" and (a[1] in self.inexact or _inexact(a))))

    def as_read(self, term: list[Atom]) -> tuple:
        """``VnnlibProperty.exact_inputs`` of a disjunct with the input bounds ``term``: every
        bound, as read, of each input that has a bound float64 does not hold (the box has their
        nearest values; a counterexample is checked against all of them,
        :meth:`VnnlibProperty.holds_exactly`)."""
        own = [a for a in term if a[0] == "x"]
        inexact = self.inexact | {a[1] for a in own if _inexact(a)}
        atoms = [*(a for i in sorted(inexact) for a in self.by_input.get(i, ())), *(a for a in own if a[1] in inexact)]
        return tuple((a[1], a[2], Fraction(a[3]), bool(a[4])) for a in atoms)


def _empty_as_read(bounds: tuple) -> bool:
    """Whether the bounds ``(i, is_upper, value, strict)`` (every bound of each input they name,
    :meth:`_InputBounds.as_read`) leave some input no real value."""
    tightest: dict[tuple[int, bool], tuple[Fraction, bool]] = {}
    for i, is_upper, q, strict in bounds:
        best = tightest.get((i, is_upper))
        if best is None or (q < best[0] if is_upper else q > best[0]):
            tightest[i, is_upper] = (q, strict)
        elif q == best[0]:
            tightest[i, is_upper] = (q, best[1] or strict)
    for (i, is_upper), (low, low_strict) in tightest.items():
        high, high_strict = tightest.get((i, True), (None, False))
        if not is_upper and high is not None and (low > high or (low == high and (low_strict or high_strict))):
            return True
    return False


def _inexact(atom: Atom) -> bool:
    return not _is_float(_float(atom[3]), atom[3])


def _top_bounds(bounds: list[tuple[str, ...]], n_in: int, text: str,
                source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The box given by the one-line input bounds ``(op, i, c, c, i)`` that ``_BOUND`` found:
    ``lo, hi`` (the nearest float64 numbers, module docstring) and no open bound."""
    lo, hi = np.full(n_in, -np.inf), np.full(n_in, np.inf)
    idx = np.array([int(b[1] or b[4]) for b in bounds], dtype=np.int64)
    if len(idx) and idx.max() >= n_in:
        name = f"X_{idx.max()}"
        line = _line_at(text, re.search(rf"\b{name}\b", text).start())
        _fail(source, line, f"undeclared variable {name!r}; add (declare-const {name} Real)")
    val = np.array([_float(Decimal(b[2] or b[3])) for b in bounds], dtype=np.float64)  # the nearest: what is fed
    upper = np.array([(b[0] == "<=") == bool(b[1]) for b in bounds], dtype=bool)  # (<= X c), (>= c X)
    np.minimum.at(hi, idx[upper], val[upper])
    np.maximum.at(lo, idx[~upper], val[~upper])
    return lo, hi, np.zeros(n_in, dtype=bool), np.zeros(n_in, dtype=bool)


def _parse_sexprs(text: str, source: str, atoms: Iterator[Atom | bool]) -> tuple[list[Any], list[int]]:
    """Nested lists of strings for each top-level form, and the line where it starts.

    Each "@" token is replaced by the next of the already converted ``atoms``.
    """
    top: list[Any] = []
    lines: list[int] = []
    stack: list[list[Any]] = []
    cur, line = top, 1
    for tok in _TOKEN.findall(text):  # the hot loop: only cheap comparisons in it
        if tok == "(":
            if cur is top:
                lines.append(line)
            new: list[Any] = []
            cur.append(new)
            stack.append(cur)
            cur = new
        elif tok == ")":
            if not stack:
                _fail(source, line, "unbalanced parentheses: unexpected ')'; remove it or add the missing '('")
            cur = stack.pop()
        elif tok == "\n":
            line += 1
        elif cur is top:
            _fail(source, line, f"unexpected {'comparison' if tok == '@' else repr(tok)} outside parentheses")
        else:
            cur.append(next(atoms) if tok == "@" else tok)
    if stack:
        _fail(source, lines[-1], "unbalanced parentheses: this '(' is never closed; add the missing ')'")
    return top, lines


def _count(names: dict[str, tuple[bool, int]], is_out: bool, source: str) -> int:
    """The number of X (or Y) variables, which must be declared as ``_0 .. _{n-1}``."""
    idx = {i for o, i in names.values() if o == is_out}
    var, n = "Y" if is_out else "X", max(idx, default=-1) + 1
    missing = min(set(range(max(n, 1))) - idx, default=None)
    if missing is not None:
        _fail(source, None, f"{var}_{missing} is not declared; add (declare-const {var}_{missing} Real)")
    return n


def _conjoin(dnfs: list[Dnf]) -> tuple[list[Atom], Dnf | None]:
    """AND of DNFs as (atoms common to all terms, product of the multi-term DNFs or None if false).

    Keeping single-term children apart avoids copying thousands of input bounds into every term.
    """
    common: list[Atom] = []
    terms: Dnf = [[]]
    for dnf in dnfs:
        if len(dnf) == 1:
            common.extend(dnf[0])
        elif dnf:
            if len(terms) * len(dnf) > MAX_DISJUNCTS:
                raise DualgraphError(f"the asserts multiply out to more than {MAX_DISJUNCTS:,} disjuncts (an "
                                     "assert of an or, times another, ...); dualgraph puts a property in "
                                     "disjunctive normal form: split it into several properties")
            terms = [t + s for t in terms for s in dnf]
        else:
            return common, None
    return common, terms


def _axpy(a: Linear, b: Linear, s: int) -> Linear:  # a + s * b, exactly
    coefs = dict(a[0])
    for v, c in b[0].items():
        coefs[v] = coefs.get(v, 0) + s * c
    return coefs, a[1] + s * b[1]


ONE = Fraction(1)


def _exact(f: float, like: Fraction | Decimal) -> Fraction | Decimal:
    """``f`` exactly, in the type of ``like`` (a decimal number read by a fast path is a
    :class:`~decimal.Decimal`, which is exact and several times cheaper than a Fraction)."""
    return Decimal(f) if isinstance(like, Decimal) else Fraction(f)


def _float(q: Fraction | Decimal) -> float:
    """The float64 number nearest ``q``, ``+-inf`` past the largest."""
    try:
        return float(q)
    except OverflowError:
        return math.inf if q > 0 else -math.inf


def _is_float(f: float, q: Fraction | Decimal) -> bool:
    """Whether the float64 number ``f`` is exactly ``q``."""
    return math.isfinite(f) and _exact(f, q) == q


def _up(q: Fraction | Decimal) -> float:
    """The smallest float64 number at least ``q`` (inf past the largest)."""
    f = _float(q)
    if f == -math.inf:
        return -float(np.finfo(np.float64).max)
    if f == math.inf or _exact(f, q) >= q:
        return f
    return float(np.nextafter(f, np.inf))


class _Reader:
    """Turns one assert's s-expression into DNF, with errors that name the assert's line."""

    def __init__(self, names: dict[str, tuple[bool, int]], source: str) -> None:
        self.names, self.source, self.line = names, source, 0

    def fail(self, msg: str) -> NoReturn:
        _fail(self.source, self.line, msg)

    def simple_atoms(self, text: str) -> tuple[str, list[Atom | bool]]:
        """Replace each simple comparison ``(op a b)`` by "@"; return its atoms in order."""
        atoms: list[Atom | bool] = []
        try:
            for groups in _SIMPLE.findall(text):  # positions are only needed for errors
                atoms.append(self.simple(*groups))
        except DualgraphError:  # convert the failing one again, knowing its line this time
            m = next(itertools.islice(_SIMPLE.finditer(text), len(atoms), None))
            self.line = _line_at(text, m.start())
            self.simple(*m.groups())
        return _SIMPLE.sub("@", text), atoms

    def simple(self, op: str, a: str, b: str) -> Atom | bool:
        """``(op a b)`` with variables or numbers ``a, b``; the common shapes skip linear forms."""
        if op[0] == ">":
            a, b = b, a  # now a <= b
        strict = len(op) == 1
        va, vb = self.names.get(a), self.names.get(b)
        if va is not None and vb is None and _NUMBER.match(b):
            return ("y", {va[1]: ONE}, Decimal(b), strict) if va[0] else ("x", va[1], True, Decimal(b), strict)
        if vb is not None and va is None and _NUMBER.match(a):
            return ("y", {vb[1]: -ONE}, Decimal(a).copy_negate(), strict) if vb[0] else ("x", vb[1], False, Decimal(a), strict)
        if va is not None and vb is not None and va[0] and vb[0] and va != vb:
            return ("y", {va[1]: ONE, vb[1]: -ONE}, Decimal(0), strict)
        return self._atom(_axpy(self._linear(a), self._linear(b), -1), strict)  # the rest, errors included

    def dnf(self, e: Any, line: int | None = None) -> Dnf:
        self.line = line or self.line  # nested calls keep the line of the assert
        if isinstance(e, (tuple, bool)):  # an atom converted by the fast path
            return [[e]] if isinstance(e, tuple) else [[]] if e else []
        if e in ("true", "false"):
            return [[]] if e == "true" else []
        head = self._head(e, "a formula")
        if head == "and":
            # atoms from the fast path skip the recursive call: `and`s of 100k bounds exist
            common, terms = _conjoin([[[a]] if type(a) is tuple else self.dnf(a) for a in e[1:]])
            return [] if terms is None else [common + t for t in terms]
        if head == "or":
            return [t for a in e[1:] for t in self.dnf(a)]
        if head not in ("<=", ">=", "<", ">", "=") or len(e) < 3:
            self.fail(f"unknown function symbol or arity in {_show(e)}; supported: and, or, <=, >=, <, >, =")
        args = [self._linear(a) for a in e[1:]]
        atoms: list[Atom | bool] = []
        strict = head in ("<", ">")
        for a, b in zip(args, args[1:]):  # a chain (<= a b c) means a <= b and b <= c
            if head in ("<=", "<", "="):
                atoms.append(self._atom(_axpy(a, b, -1), strict))
            if head in (">=", ">", "="):
                atoms.append(self._atom(_axpy(b, a, -1), strict))
        return [] if any(a is False for a in atoms) else [[a for a in atoms if a is not True]]

    def _head(self, e: Any, what: str) -> str:
        if not isinstance(e, list) or not e or not isinstance(e[0], str):
            self.fail(f"expected {what}, got {_show(e)}")
        return e[0]

    def _atom(self, form: Linear, strict: bool = False) -> Atom | bool:
        """Normalise ``form <= 0`` (``< 0`` if ``strict``); a comparison of constants is simply
        ``True``/``False``."""
        coefs, k = {v: c for v, c in form[0].items() if c != 0}, form[1]
        n_out = sum(1 for v in coefs if v[0])
        if not coefs:
            return bool(k < 0) if strict else bool(k <= 0)
        if n_out == len(coefs):
            for c in coefs.values():
                f = _float(c)
                if not math.isfinite(f) or abs(Fraction(f) - c) > abs(c) / 2 ** 53:
                    shown = format(Decimal(c.numerator) / Decimal(c.denominator), ".6g")
                    self.fail(f"the coefficient {shown} of an output comparison is beyond what float64 holds to "
                              "2^-53 relative; scale the comparison")
            return ("y", {j: c for (_, j), c in coefs.items()}, -k, strict)
        if n_out:
            self.fail("mixed input/output constraints are not supported; compare X and Y in separate asserts")
        if len(coefs) > 1:
            self.fail("an input constraint must bound one X_i by a constant; linear input constraints are not supported")
        ((_, i), c), = coefs.items()
        return ("x", i, c > 0, -k / c, strict)  # c*x + k <= 0: an upper bound if c > 0, else a lower one

    def _linear(self, e: Any) -> Linear:
        if isinstance(e, str):
            if e in self.names:
                return {self.names[e]: ONE}, Fraction(0)
            if _NUMBER.match(e):
                return {}, Fraction(e)
            if _VARIABLE.match(e):
                self.fail(f"undeclared variable {e!r}; add (declare-const {e} Real)")
            self.fail(f"unknown symbol {e!r}; expected a declared X_i/Y_j or a decimal number")
        head = self._head(e, "a term")
        args = [self._linear(a) for a in e[1:]]
        if head in ("+", "-") and args:
            acc = ({}, Fraction(0)) if head == "-" and len(args) == 1 else args.pop(0)  # unary minus: 0 - a
            for a in args:
                acc = _axpy(acc, a, -1 if head == "-" else 1)
            return acc
        if head == "*" and args:
            if sum(1 for a in args if a[0]) > 1:
                self.fail(f"non-linear term {_show(e)}: at most one factor of * may contain a variable")
            scale = math.prod((a[1] for a in args if not a[0]), start=ONE)
            var = next((a for a in args if a[0]), ({}, ONE))
            return {v: c * scale for v, c in var[0].items()}, var[1] * scale
        self.fail(f"unknown function symbol {head!r} in the term {_show(e)}; supported: + - *")


def _show(e: Any) -> str:
    """A short one-line rendering of an s-expression for error messages."""
    s = "(" + " ".join(map(_show, e)) + ")" if isinstance(e, list) else e if isinstance(e, str) else "(comparison)"
    return s if len(s) <= 60 else s[:57] + "..."


def _narrow(atoms: list[Atom], lo: np.ndarray, hi: np.ndarray,
            open_lo: np.ndarray, open_hi: np.ndarray) -> dict[int, tuple[float, float, bool, bool]]:
    """``{i: (lo_i, hi_i, lo_i open, hi_i open)}`` for the inputs whose bounds the atoms narrow
    inside ``[lo, hi]`` (or make open: of two equal bounds the strict one counts)."""
    box: dict[int, tuple[float, float, bool, bool]] = {}
    for a in atoms:
        if a[0] == "x":
            i, is_upper, bound = a[1], a[2], _float(a[3])  # the nearest float64: what is fed
            strict = a[4] and _is_float(bound, a[3])  # X > c for an inexact c is X >= the floats above c
            l, h, lo_open, hi_open = box.get(i, (float(lo[i]), float(hi[i]), bool(open_lo[i]), bool(open_hi[i])))
            if is_upper:
                box[i] = (l, bound, lo_open, strict) if bound < h else (l, h, lo_open, hi_open or (strict and bound == h))
            else:
                box[i] = (bound, h, strict, hi_open) if bound > l else (l, h, lo_open or (strict and bound == l), hi_open)
    return {i: b for i, b in box.items() if b != (lo[i], hi[i], open_lo[i], open_hi[i])}


def _conjunctions(row_lists: list[list[Atom]], n_out: int) -> list[Conjunction]:
    """One conjunction per list of output atoms, as views of one matrix (one fill, not 50k)."""
    flat = [a for rows in row_lists for a in rows]
    entries = [(r, j, float(c)) for r, a in enumerate(flat) for j, c in a[1].items()]  # exact (_Reader._atom)
    C = np.zeros((len(flat), n_out))
    if entries:
        r, j, c = zip(*entries)
        C[list(r), list(j)] = c
    d = np.array([_up(a[2]) for a in flat], dtype=np.float64)  # C y <= d_up holds the exact region
    moved = [not _is_float(float(u), a[2]) for a, u in zip(flat, d)]
    strict = np.array([a[3] or m for a, m in zip(flat, moved)], dtype=bool)
    C, d, strict = _frozen(C), _frozen(d), _frozen(strict)
    ends = np.cumsum([len(x) for x in row_lists]).tolist()
    # rows whose C or d is rounded keep their exact form: counterexamples are checked against it
    rounded = [m or any(Fraction(float(c)) != c for c in a[1].values()) for a, m in zip(flat, moved)]
    return [Conjunction(C[e - len(x) : e], d[e - len(x) : e], strict[e - len(x) : e] if strict.any() else None,
                        tuple((a[1], a[2], a[3]) for a in x) if any(rounded[e - len(x) : e]) else None)
            for x, e in zip(row_lists, ends)]


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # the dataclasses are frozen; make their arrays read-only too
    return a

