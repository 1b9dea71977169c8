"""Test helper: a small PromQL evaluator, so tests can check what a dashboard panel or an alert
*shows* on recorded samples, not only which metric names it reads.

The project installs no Prometheus (CI runs on a clean machine), so this implements the subset
of PromQL the dashboard and the alert rules use, with Prometheus' semantics: instant selectors
with a 5-minute lookback and staleness markers, range selectors and subqueries (left-open
windows, as in Prometheus 3), ``rate``/``increase`` with Prometheus' extrapolation,
``histogram_quantile`` with its bucket interpolation, ``avg_over_time``, ``absent``,
``vector``, ``round``, aggregations (sum, avg, min, max, count; ``by``/``without``), and binary
operators with one-to-one vector matching (``on``/``ignoring``), ``bool`` and the set
operators ``and``/``or``/``unless``. Anything else raises NotImplementedError, so a new query
shape fails loudly instead of being evaluated wrongly. ``test_dashboard.py`` cross-checks it
against ``promtool`` where one is installed.

Times are seconds. An instant vector is a dict {labels: value}, labels a sorted tuple of
(name, value) pairs including ``__name__`` while a series keeps its name.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Vector = dict[Labels, float]
Matrix = dict[Labels, list[tuple[float, float]]]

LOOKBACK_S = 300.0
# What Grafana's $__rate_interval becomes with a 15 s scrape interval (4 x scrape interval).
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}


def labels_of(mapping: dict[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


def without_name(labels: Labels) -> Labels:
    return tuple(item for item in labels if item[0] != "__name__")


# ------------------------------------------------------------------------ samples


@dataclass
class SampleStore:
    """Scraped samples, as Prometheus stores them: one list of (t, value) per series, a value
    of None being a staleness marker (the series vanished from its target's scrape)."""

    series: dict[Labels, list[tuple[float, float | None]]] = field(default_factory=dict)
    _last_scrape: dict[Labels, set[Labels]] = field(default_factory=dict)

    def add(self, labels: Labels, t: float, value: float | None) -> None:
        points = self.series.setdefault(labels, [])
        assert not points or points[-1][0] < t, f"samples out of order for {labels}"
        points.append((t, value))

    def scrape(self, t: float, target: dict[str, str], exposition: str) -> None:
        """One successful scrape of ``target`` (its target labels, e.g. job and pod) at ``t``:
        ``exposition`` is the /metrics text, parsed by prometheus_client's own parser."""
        key = labels_of(target)
        seen: set[Labels] = set()
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                labels = labels_of({**sample.labels, **target, "__name__": sample.name})
                self.add(labels, t, float(sample.value))
                seen.add(labels)
        self._mark_stale(key, t, seen)
        self._last_scrape[key] = seen
        self.add(labels_of({**target, "__name__": "up"}), t, 1.0)

    def scrape_failed(self, t: float, target: dict[str, str]) -> None:
        """A scrape that failed (pod gone, port closed): up = 0, its series go stale."""
        key = labels_of(target)
        self._mark_stale(key, t, set())
        self._last_scrape[key] = set()
        self.add(labels_of({**target, "__name__": "up"}), t, 0.0)

    def _mark_stale(self, key: Labels, t: float, seen: set[Labels]) -> None:
        for labels in self._last_scrape.get(key, set()) - seen:
            self.add(labels, t, None)


# ------------------------------------------------------------------------- parser

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_s(text: str) -> float:
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<range>\[[^\]]*\])
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=(){},])
    )""",
    re.VERBOSE,
)
_AGGREGATIONS = {"sum", "avg", "min", "max", "count"}
_COMPARISONS = {"==", "!=", "<", ">", "<=", ">="}


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Selector:
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


@dataclass(frozen=True)
class Range:
    expr: object
    range_s: float
    step_s: float | None  # None: a range selector; else a subquery


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple


@dataclass(frozen=True)
class Aggregate:
    op: str
    grouping: tuple[str, ...]
    without: bool
    expr: object


@dataclass(frozen=True)
class Binary:
    op: str
    lhs: object
    rhs: object
    bool_: bool = False
    on: tuple[str, ...] | None = None
    ignoring: tuple[str, ...] = ()


class _Parser:
    def __init__(self, text: str):
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise ValueError(f"cannot tokenize {text[pos:]!r}")
            kind = match.lastgroup
            self.tokens.append((kind, match.group(kind)))
            pos = match.end()
        self.i = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.i + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> str:
        kind, text = self.peek()
        if value is not None and text != value:
            raise ValueError(f"expected {value!r}, got {text!r} at token {self.i}")
        if kind == "end":
            raise ValueError("unexpected end of expression")
        self.i += 1
        return text

    def parse(self):
        expr = self.binary(0)
        if self.peek()[0] != "end":
            raise ValueError(f"unexpected {self.peek()[1]!r}")
        return expr

    # Lowest to highest precedence; all left-associative ("^" is not used here).
    _LEVELS = (("or",), ("and", "unless"), tuple(_COMPARISONS), ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int):
        if level == len(self._LEVELS):
            return self.unary()
        lhs = self.binary(level + 1)
        while self.peek()[1] in self._LEVELS[level]:
            op = self.take()
            bool_ = False
            if self.peek()[1] == "bool":
                self.take()
                bool_ = True
            on, ignoring = None, ()
            if self.peek()[1] in ("on", "ignoring"):
                which = self.take()
                names = self.label_list()
                on, ignoring = (names, ()) if which == "on" else (None, names)
            if self.peek()[1] in ("group_left", "group_right"):
                raise NotImplementedError("group_left/group_right")
            rhs = self.binary(level + 1)
            lhs = Binary(op, lhs, rhs, bool_, on, ignoring)
        return lhs

    def unary(self):
        if self.peek()[1] == "-":
            self.take()
            return Binary("*", Number(-1.0), self.unary())
        expr = self.primary()
        while self.peek()[0] == "range":
            inner = self.take()[1:-1]
            if ":" in inner:
                range_text, step_text = inner.split(":")
                expr = Range(expr, duration_s(range_text), duration_s(step_text or "1m"))
            else:
                expr = Range(expr, duration_s(inner), None)
        return expr

    def label_list(self) -> tuple[str, ...]:
        self.take("(")
        names = []
        while self.peek()[1] != ")":
            names.append(self.take())
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return tuple(names)

    def primary(self):
        kind, text = self.peek()
        if kind == "number":
            self.take()
            return Number(float(text))
        if text == "(":
            self.take()
            expr = self.binary(0)
            self.take(")")
            return expr
        if text == "{":
            return Selector(self.matchers())
        if kind != "ident":
            raise ValueError(f"unexpected {text!r}")
        if text in _AGGREGATIONS:
            self.take()
            grouping, without = (), False
            if self.peek()[1] in ("by", "without"):
                without = self.take() == "without"
                grouping = self.label_list()
            self.take("(")
            expr = self.binary(0)
            self.take(")")
            if self.peek()[1] in ("by", "without"):
                without = self.take() == "without"
                grouping = self.label_list()
            return Aggregate(text, grouping, without, expr)
        if self.peek(1)[1] == "(":
            self.take()
            self.take("(")
            args = []
            while self.peek()[1] != ")":
                args.append(self.binary(0))
                if self.peek()[1] == ",":
                    self.take()
            self.take(")")
            return Call(text, tuple(args))
        self.take()
        matchers = self.matchers() if self.peek()[1] == "{" else ()
        return Selector((("__name__", "=", text), *matchers))

    def matchers(self) -> tuple[tuple[str, str, str], ...]:
        self.take("{")
        found = []
        while self.peek()[1] != "}":
            label = self.take()
            op = self.take()
            if op not in ("=", "!=", "=~", "!~"):
                raise ValueError(f"bad matcher operator {op!r}")
            kind, value = self.peek()
            if kind != "string":
                raise ValueError(f"matcher value must be a string, got {value!r}")
            self.take()
            found.append((label, op, bytes(value[1:-1], "utf-8").decode("unicode_escape")))
            if self.peek()[1] == ",":
                self.take()
        self.take("}")
        return tuple(found)


def parse(expr: str):
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return _Parser(expr).parse()


# ---------------------------------------------------------------------- evaluator


def evaluate(expr: str, store: SampleStore, t: float) -> float | Vector:
    """The instant query ``expr`` at time ``t``: a float (scalar) or an instant vector."""
    result = _Evaluator(store).eval(parse(expr), t)
    if isinstance(result, dict) and result and isinstance(next(iter(result.values())), list):
        raise ValueError("a range vector is not a valid query result")
    return result


def by_label(vector: Vector, label: str) -> dict[str, float]:
    """{value of ``label``: sample value}; a vector with no such label maps from ""."""
    out: dict[str, float] = {}
    for labels, value in vector.items():
        key = dict(labels).get(label, "")
        assert key not in out, f"two samples with {label}={key!r}"
        out[key] = value
    return out


def _matches(labels: dict[str, str], matchers) -> bool:
    for label, op, value in matchers:
        actual = labels.get(label, "")
        if op == "=" and actual != value:
            return False
        if op == "!=" and actual == value:
            return False
        if op == "=~" and not re.fullmatch(value, actual):
            return False
        if op == "!~" and re.fullmatch(value, actual):
            return False
    return True


class _Evaluator:
    def __init__(self, store: SampleStore):
        self.store = store

    def eval(self, node, t: float):
        method = getattr(self, f"_{type(node).__name__.lower()}")
        return method(node, t)

    def _number(self, node: Number, t: float) -> float:
        return node.value

    def _selector(self, node: Selector, t: float) -> Vector:
        out: Vector = {}
        for labels, points in self.store.series.items():
            if not _matches(dict(labels), node.matchers):
                continue
            recent = [p for p in points if t - LOOKBACK_S < p[0] <= t]
            if recent and recent[-1][1] is not None:
                out[labels] = recent[-1][1]
        return out

    def _range(self, node: Range, t: float) -> Matrix:
        start = t - node.range_s
        if node.step_s is None:
            if not isinstance(node.expr, Selector):
                raise ValueError("a range selector needs a plain selector")
            out: Matrix = {}
            for labels, points in self.store.series.items():
                if _matches(dict(labels), node.expr.matchers):
                    window = [(pt, v) for pt, v in points if start < pt <= t and v is not None]
                    if window:
                        out[labels] = window
            return out
        # Subquery: the inner query at multiples of the step (absolute time) in (start, t].
        out = defaultdict(list)
        step_t = math.floor(start / node.step_s) * node.step_s + node.step_s
        while step_t <= t + 1e-9:
            inner = self.eval(node.expr, step_t)
            if not isinstance(inner, dict):
                raise NotImplementedError("subquery of a scalar")
            for labels, value in inner.items():
                out[labels].append((step_t, value))
            step_t += node.step_s
        return dict(out)

    def _call(self, node: Call, t: float):
        name = node.name
        if name in ("rate", "increase"):
            (arg,) = node.args
            if not (isinstance(arg, Range) and arg.step_s is None):
                raise ValueError(f"{name} needs a range selector")
            matrix = self.eval(arg, t)
            out = {}
            for labels, points in matrix.items():
                value = _extrapolated_rate(points, t - arg.range_s, t, is_rate=name == "rate")
                if value is not None:
                    out[without_name(labels)] = value
            return out
        if name == "avg_over_time":
            (arg,) = node.args
            matrix = self.eval(arg, t)
            return {without_name(k): sum(v for _, v in pts) / len(pts) for k, pts in matrix.items()}
        if name == "histogram_quantile":
            q = self.eval(node.args[0], t)
            vector = self.eval(node.args[1], t)
            buckets: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
            for labels, value in vector.items():
                mapping = dict(labels)
                if "le" not in mapping:
                    continue
                le = float(mapping.pop("le"))
                mapping.pop("__name__", None)
                buckets[labels_of(mapping)].append((le, value))
            return {k: _bucket_quantile(q, b) for k, b in buckets.items()}
        if name == "absent":
            (arg,) = node.args
            if self.eval(arg, t):
                return {}
            equal = {}
            if isinstance(arg, Selector):
                equal = {
                    label: value
                    for label, op, value in arg.matchers
                    if op == "=" and label != "__name__"
                }
            return {labels_of(equal): 1.0}
        if name == "vector":
            return {(): float(self.eval(node.args[0], t))}
        if name == "round":
            vector = self.eval(node.args[0], t)
            to_nearest = self.eval(node.args[1], t) if len(node.args) > 1 else 1.0
            inverse = 1.0 / to_nearest
            return {
                without_name(k): math.floor(v * inverse + 0.5) / inverse for k, v in vector.items()
            }
        raise NotImplementedError(f"function {name}")

    def _aggregate(self, node: Aggregate, t: float) -> Vector:
        vector = self.eval(node.expr, t)
        if not isinstance(vector, dict):
            raise ValueError(f"{node.op} of a scalar")
        groups: dict[Labels, list[float]] = defaultdict(list)
        for labels, value in vector.items():
            mapping = dict(labels)
            if node.without:
                key = {
                    k: v for k, v in mapping.items() if k not in node.grouping and k != "__name__"
                }
            else:
                key = {k: v for k, v in mapping.items() if k in node.grouping}
            groups[labels_of(key)].append(value)
        combine = {
            "sum": sum,
            "max": max,
            "min": min,
            "count": len,
            "avg": lambda values: sum(values) / len(values),
        }[node.op]
        return {key: float(combine(values)) for key, values in groups.items()}

    def _binary(self, node: Binary, t: float):
        lhs, rhs = self.eval(node.lhs, t), self.eval(node.rhs, t)
        op = node.op
        if op in ("and", "or", "unless"):
            if not (isinstance(lhs, dict) and isinstance(rhs, dict)):
                raise ValueError(f"{op} needs two vectors")
            signature = self._signature(node)
            right = {signature(k) for k in rhs}
            if op == "and":
                return {k: v for k, v in lhs.items() if signature(k) in right}
            if op == "unless":
                return {k: v for k, v in lhs.items() if signature(k) not in right}
            left = {signature(k) for k in lhs}
            return {**lhs, **{k: v for k, v in rhs.items() if signature(k) not in left}}
        comparison = op in _COMPARISONS
        if not isinstance(lhs, dict) and not isinstance(rhs, dict):
            if comparison and not node.bool_:
                raise ValueError("comparisons between scalars need bool")
            return _apply(op, lhs, rhs)
        keep_name = comparison and not node.bool_
        if not isinstance(lhs, dict) or not isinstance(rhs, dict):
            vector, scalar_first = (rhs, True) if isinstance(rhs, dict) else (lhs, False)
            scalar = lhs if scalar_first else rhs
            out = {}
            for labels, value in vector.items():
                a, b = (scalar, value) if scalar_first else (value, scalar)
                result = _apply(op, a, b)
                if comparison and not node.bool_:
                    if result:
                        out[labels] = value
                    continue
                out[labels if keep_name else without_name(labels)] = result
            return out
        signature = self._signature(node)
        right: dict[Labels, float] = {}
        for labels, value in rhs.items():
            key = signature(labels)
            if key in right:
                raise ValueError(f"many-to-many matching on {key} (right side of {op})")
            right[key] = value
        out = {}
        for labels, value in lhs.items():
            key = signature(labels)
            if key not in right:
                continue
            result = _apply(op, value, right[key])
            if comparison and not node.bool_:
                if result:
                    out[labels] = value
                continue
            if node.on is not None:
                result_labels = labels_of({k: v for k, v in labels if k in node.on})
            else:
                result_labels = tuple(
                    (k, v) for k, v in without_name(labels) if k not in node.ignoring
                )
            if result_labels in out:
                raise ValueError(f"duplicate series {result_labels} in the result of {op}")
            out[result_labels] = result
        return out

    @staticmethod
    def _signature(node: Binary):
        if node.on is not None:
            return lambda labels: tuple((k, v) for k, v in labels if k in node.on)
        return lambda labels: tuple(
            (k, v) for k, v in without_name(labels) if k not in node.ignoring
        )


def _apply(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
        return a / b
    if op == "%":
        return math.fmod(a, b) if b else math.nan
    comparisons = {"==": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}
    if op in comparisons:
        return float(comparisons[op])
    raise NotImplementedError(f"operator {op}")


def _extrapolated_rate(points, range_start: float, range_end: float, is_rate: bool):
    """Prometheus' extrapolatedRate for counters (promql/functions.go)."""
    if len(points) < 2:
        return None
    first_t, first_v = points[0]
    last_t, last_v = points[-1]
    result = last_v - first_v
    previous = first_v
    for _, value in points[1:]:
        if value < previous:  # a counter reset
            result += previous
        previous = value
    sampled = last_t - first_t
    average_gap = sampled / (len(points) - 1)
    to_start = first_t - range_start
    to_end = range_end - last_t
    if result > 0 and first_v >= 0:
        # A counter cannot go below 0: do not extrapolate past its zero point.
        to_start = min(to_start, sampled * (first_v / result))
    threshold = average_gap * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average_gap / 2
    interval += to_end if to_end < threshold else average_gap / 2
    result *= interval / sampled
    if is_rate:
        result /= range_end - range_start
    return result


def _bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' bucketQuantile: linear interpolation inside the bucket holding the rank,
    the first bucket starting at 0, the +Inf bucket answered with the highest finite bound."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]):
        return math.nan
    merged: list[list[float]] = []
    for upper, count in buckets:  # coalesce equal bounds
        if merged and merged[-1][0] == upper:
            merged[-1][1] += count
        else:
            merged.append([upper, count])
    for i in range(1, len(merged)):  # ensure monotonic
        merged[i][1] = max(merged[i][1], merged[i - 1][1])
    if len(merged) < 2:
        return math.nan
    observations = merged[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = next((i for i in range(len(merged) - 1) if merged[i][1] >= rank), len(merged) - 1)
    if b == len(merged) - 1:
        return merged[-2][0]
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0]
    start, end, count = 0.0, merged[b][0], merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    return start + (end - start) * (rank / count)
