"""Statistics for benchmark numbers, in pure Python (no scipy in the suite's core).

Three layers:
  - descriptive: `describe(values)` gives n, median, quartiles, IQR, min, max, mean, standard
    deviation and a t-based 95% confidence interval of the mean; `step_statistics` is its
    summary of one run's step times, as the run record holds it;
  - tests: `mann_whitney_u` (two-sided; exact for small samples without ties, else the normal
    approximation with tie and continuity correction) and `welch_t_test` (two-sided; the
    Student t distribution via the regularized incomplete beta function), both checked against
    scipy in tests/test_stats.py;
  - summaries: `summarize_runs(runs)` turns the runs of a result file into one row per backend
    configuration (backend, dtype, device, model config), combining repeats, with instability
    warnings that say what to do about them.

Over repeats, the unit of measurement is one run (one fresh process): each run's per-step median
and its total are one sample each. The spread of the steps inside one run is not noise: with
batch size 1 every step trains on a different name, and step time grows with the name's length.
"""
from __future__ import annotations

import math
import statistics

from bench.record import (CI_HIGH, CI_LOW, DIVISION, FINAL_LOSS, FIRST_STEP_MS,
                          FLOPS_PER_STEP, GFLOPS, MEDIAN_MS, PERCENT_OF_PEAK, REPEATS,
                          ROW_FIGURES, SAMPLING_ROW_KEY, SAMPLING_S, SPEEDUP_VS_NUMPY,
                          SPEEDUP_VS_SLOWEST, STEP_MS, TIMING_BASIS, TRAIN_S, TUNINGS, is_timed,
                          losses_of)

CONFIDENCE = 0.95
# A run-to-run spread (IQR over the median, or standard deviation over the mean) above this is
# reported as unstable, as pyperf and asv do.
SPREAD_WARNING = 0.10
# The first run is "far slower" when its per-step median is this much above the others' median
# (and above all of them).
FIRST_RUN_WARNING = 0.20
MIN_RUNS_FOR_SPREAD = 3

QUIETER_MACHINE_ADVICE = (
    "close other programs or use a quieter machine, pin threads (OMP_NUM_THREADS=1, or "
    "taskset -c 0 python bench.py ...), and add repeats (--repeat 10)")


# ---- descriptive ---------------------------------------------------------------------------
def quantile(sorted_values: list[float], fraction: float) -> float:
    """Linear interpolation between order statistics (numpy's default, 'inclusive'): never
    outside [min, max], which matters for the 3 to 5 repeats a benchmark usually has."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1 - weight) + sorted_values[upper] * weight


def describe(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """n, median, q1, q3, iqr, min, max, mean, std (sample, n-1) and ci_low/ci_high: the t-based
    confidence interval of the mean (None with fewer than 2 values)."""
    data = sorted(float(value) for value in values)
    n = len(data)
    if n == 0:
        return {"n": 0}
    mean = statistics.fmean(data)
    std = statistics.stdev(data) if n > 1 else None
    q1, q3 = quantile(data, 0.25), quantile(data, 0.75)
    summary = {"n": n, "median": statistics.median(data), "q1": q1, "q3": q3, "iqr": q3 - q1,
               "min": data[0], "max": data[-1], "mean": mean, "std": std,
               "ci_low": None, "ci_high": None, "ci_method": None}
    if n > 1:
        half_width = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        summary.update(ci_low=mean - half_width, ci_high=mean + half_width,
                       ci_method=f"t, {confidence:.0%} CI of the mean")
    return summary


def step_statistics(step_seconds: list[float]) -> dict:
    """A run's figures of its step times: in ms over steps 2..N (the first step may include
    lazy compilation and is reported apart), and the total of all in s."""
    if not step_seconds:
        return {}
    summary = describe([1e3 * seconds for seconds in step_seconds[1:] or step_seconds])
    summary["std"] = summary["std"] or 0.0  # a single step
    return {FIRST_STEP_MS.key: 1e3 * step_seconds[0],
            **{key: summary[name] for name, key in STEP_MS.items()},
            TRAIN_S.key: sum(step_seconds)}


# ---- special functions ---------------------------------------------------------------------
def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, evaluated with the modified
    Lentz method; converges quickly for x < (a + 1) / (a + b + 2)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        # Even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).
        numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        result *= d * c
        # Odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        result *= delta
        if abs(delta - 1.0) < epsilon:
            return result
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # Use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges faster.
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_quantile(probability: float, df: float) -> float:
    """The t value with P(T <= t) = probability (bisection on t_sf; 1e-12 relative)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    target = 1.0 - probability  # upper tail
    low, high = 0.0, 1.0
    while t_sf(high, df) > target:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_sf(middle, df) > target:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


# ---- two-sample tests ----------------------------------------------------------------------
class TestResult(dict):
    """statistic, p_value (two-sided) and method; a dict so it serialises as is."""

    @property
    def p_value(self) -> float:
        return self["p_value"]

    @property
    def statistic(self) -> float:
        return self["statistic"]


def _midranks(values: list[float]) -> tuple[list[float], list[int]]:
    """Ranks 1..n with ties given their average rank, and the sizes of the tie groups."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    tie_sizes = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1
        for index in order[start:end + 1]:
            ranks[index] = average_rank
        tie_sizes.append(end - start + 1)
        start = end + 1
    return ranks, tie_sizes


def _mann_whitney_exact_sf(u: int, n1: int, n2: int) -> float:
    """P(U >= u) under the null hypothesis without ties: the number of arrangements of n1 + n2
    ranks with each U value, counted by the recurrence on the largest rank."""
    # counts[i][j][k]: arrangements of i x's and j y's with U = k, built for i <= n1, j <= n2.
    max_u = n1 * n2
    previous_row = [[1] + [0] * max_u for _ in range(n2 + 1)]  # i = 0: U is 0
    for i in range(1, n1 + 1):
        row = [[1] + [0] * max_u]  # j = 0: U is 0
        for j in range(1, n2 + 1):
            # The largest of the i + j values is an x (adds j to U) or a y (adds nothing).
            from_x, from_y = previous_row[j], row[j - 1]
            row.append([from_y[k] + (from_x[k - j] if k >= j else 0) for k in range(max_u + 1)])
        previous_row = row
    counts = previous_row[n2]
    total = sum(counts)
    return sum(counts[max(u, 0):]) / total


def mann_whitney_u(x: list[float], y: list[float], exact_max_n: int = 8) -> TestResult:
    """Two-sided Mann-Whitney U test of x against y. `statistic` is U of x (the number of pairs
    with x > y, ties counting one half). Exact when both samples have at most `exact_max_n`
    values and there are no ties; otherwise the normal approximation with tie correction and
    continuity correction (as scipy.stats.mannwhitneyu with method='asymptotic')."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney U needs at least one value on each side")
    ranks, tie_sizes = _midranks(list(x) + list(y))
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u_larger = max(u1, n1 * n2 - u1)
    n = n1 + n2
    ties = any(size > 1 for size in tie_sizes)
    if max(n1, n2) <= exact_max_n and not ties:
        p_value = min(1.0, 2 * _mann_whitney_exact_sf(round(u_larger), n1, n2))
        return TestResult(statistic=u1, p_value=p_value, method="Mann-Whitney U (exact)")
    tie_term = sum(size ** 3 - size for size in tie_sizes) / (n * (n - 1))
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:  # every value equal
        return TestResult(statistic=u1, p_value=1.0, method="Mann-Whitney U (normal approx.)")
    z = (u_larger - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    p_value = min(1.0, 2 * normal_sf(z))
    return TestResult(statistic=u1, p_value=p_value, method="Mann-Whitney U (normal approx.)")


def welch_t_test(x: list[float], y: list[float]) -> TestResult:
    """Two-sided Welch's t-test (unequal variances) of mean(x) against mean(y); also returns
    `df` (Welch-Satterthwaite) and the 95% confidence interval of mean(x) - mean(y)."""
    n1, n2 = len(x), len(y)
    if n1 < 2 or n2 < 2:
        raise ValueError("Welch's t-test needs at least two values on each side")
    mean1, mean2 = statistics.fmean(x), statistics.fmean(y)
    se1, se2 = statistics.variance(x) / n1, statistics.variance(y) / n2
    difference = mean1 - mean2
    standard_error = math.sqrt(se1 + se2)
    method = "Welch's t-test"
    if standard_error == 0:  # no spread on either side
        p_value = 1.0 if difference == 0 else 0.0
        statistic = 0.0 if difference == 0 else math.copysign(math.inf, difference)
        return TestResult(statistic=statistic, p_value=p_value, df=float(n1 + n2 - 2),
                          ci_low=difference, ci_high=difference, method=method)
    df = (se1 + se2) ** 2 / ((se1 ** 2 / (n1 - 1) if se1 else 0.0)
                             + (se2 ** 2 / (n2 - 1) if se2 else 0.0))
    statistic = difference / standard_error
    p_value = min(1.0, 2 * t_sf(abs(statistic), df))
    half_width = t_quantile(0.5 + CONFIDENCE / 2, df) * standard_error
    return TestResult(statistic=statistic, p_value=p_value, df=df, ci_low=difference - half_width,
                      ci_high=difference + half_width, method=method)


# ---- configurations --------------------------------------------------------------------------
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "block_size")


def config_label(config: dict | None) -> str:
    """A short name for a model config: the preset it matches (tiny, small, ...) or its shape,
    with the batch size when it is not 1."""
    if not config:
        return "?"
    from backends.contract import PRESETS
    shape = tuple(config.get(field) for field in SHAPE_FIELDS)
    name = next((preset_name for preset_name, preset in PRESETS.items()
                 if tuple(getattr(preset, field) for field in SHAPE_FIELDS) == shape), None)
    if name is None:
        name = "L{}-d{}-h{}-T{}".format(*shape)
    batch = config.get("batch_size", 1)
    return name if batch == 1 else f"{name} b{batch}"


def config_key(config: dict | None) -> tuple:
    """Runs are only combined when their whole config (shape, batch, steps, ...) is equal."""
    return tuple(sorted((config or {}).items()))


# ---- summaries of runs -----------------------------------------------------------------------
def run_key(run: dict) -> tuple:
    """Runs of one configuration: the same backend name, dtype, device and model config, and
    the same implementation (a name that moved to another implementation, as `torch` did when
    the divisions came, is another configuration; None in files from before divisions)."""
    return (run["backend"], run.get("dtype"), run.get("device"), config_key(run.get("config")),
            run.get("implementation"))


def group_runs(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by (backend, dtype, device, config), in order of first appearance. A run
    without a device (one that failed before the backend chose it) joins the group of the
    same backend, dtype and config, so a crashed repeat counts against its configuration."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = run_key(run)
        if key[2] is None:
            key = next((existing for existing in groups
                        if existing[:2] == key[:2] and existing[3:] == key[3:]), key)
        groups.setdefault(key, []).append(run)
    # Failed runs seen before any successful one: move them to the group that got a device.
    for key in [key for key in groups if key[2] is None]:
        target = next((other for other in groups
                       if other[2] is not None and other[:2] == key[:2] and other[3:] == key[3:]),
                      None)
        if target is not None:
            groups[target] = groups.pop(key) + groups[target]
    return groups


def _values(runs: list[dict], figure) -> list[float]:
    return [value for value in map(figure.of, runs) if value is not None]


def instability_warnings(timed_runs: list[dict]) -> list[str]:
    """What looks unreliable about a configuration's repeats, each with what to do."""
    warnings = []
    medians = _values(timed_runs, MEDIAN_MS)
    if len(medians) < 2:
        return warnings
    summary = describe(medians)
    if len(medians) >= MIN_RUNS_FOR_SPREAD and summary["iqr"] > SPREAD_WARNING * summary["median"]:
        warnings.append(
            f"unstable: the run-to-run IQR of ms/step is {summary['iqr'] / summary['median']:.0%} "
            f"of the median over {len(medians)} runs (over {SPREAD_WARNING:.0%}); "
            + QUIETER_MACHINE_ADVICE)
    elif summary["std"] > SPREAD_WARNING * summary["mean"]:
        warnings.append(
            f"unstable: the run-to-run standard deviation of ms/step is "
            f"{summary['std'] / summary['mean']:.0%} of the mean over {len(medians)} runs "
            f"(over {SPREAD_WARNING:.0%}); " + QUIETER_MACHINE_ADVICE)
    if len(timed_runs) >= MIN_RUNS_FOR_SPREAD:
        ordered = sorted(timed_runs, key=lambda run: run.get("repeat", 0))
        first = MEDIAN_MS.of(ordered[0])
        rest = [MEDIAN_MS.of(run) for run in ordered[1:]]
        typical = statistics.median(rest)
        if first > (1 + FIRST_RUN_WARNING) * typical and first > max(rest):
            warnings.append(
                f"first run {first / typical - 1:.0%} slower than the others: the machine was "
                f"not warmed up (CPU clock, caches, another job finishing); add --warmup steps, "
                f"or run a throw-away round first, and keep --repeat >= 5 so it is outvoted")
    return warnings


def summarize_runs(runs: list[dict], peak_gflops: float | None = None) -> list[dict]:
    """One row per configuration: backend, dtype, device, config (its label), config_key,
    steps, n (timed runs), status; for each of bench.record.ROW_FIGURES the median over the
    timed runs (so ms_per_step_median is the median over repeats of each run's per-step
    median); final_loss; CI_LOW/CI_HIGH (t 95% CI over repeats, None for n < 2);
    SPEEDUP_VS_SLOWEST / SPEEDUP_VS_NUMPY (within the same model config). `repeats` holds the
    full `describe` over repeats of the REPEATS figures; `warnings` lists instability warnings.
    A row without timed runs has the status and error of its last run instead of figures."""
    rows = []
    for (backend, dtype, device, *_), group in group_runs(runs).items():
        timed = [run for run in group if is_timed(run)]
        config = group[0].get("config")
        row = {"backend": backend, "dtype": dtype, "device": device, "n": len(timed),
               DIVISION: group[0].get(DIVISION), TUNINGS: group[0].get(TUNINGS) or [],
               "config": config_label(config), "config_key": config_key(config),
               "steps": group[0].get("steps") or (config or {}).get("num_steps"),
               "kind": group[0].get("kind"), "warnings": []}
        if not timed:
            last = group[-1]
            row.update({"status": last.get("status", "?"),
                        "error": last.get("error") or last.get("note"),
                        FINAL_LOSS: (losses_of(last) or [None])[-1]})
            rows.append(row)
            continue
        status = timed[0]["status"]  # "ok", or "different init" for an external program
        row["status"] = (status if len(timed) == len(group)
                         else f"{status} ({len(group) - len(timed)} failed)")
        for figure in ROW_FIGURES:
            values = _values(timed, figure)
            row[figure.key] = statistics.median(values) if values else None
        # An external program's ms/step: its steady state or its end-to-end time / N
        # (bench.external); repeats measured both ways are "mixed".
        bases = set(_values(timed, TIMING_BASIS))
        if bases:
            row[TIMING_BASIS.key] = bases.pop() if len(bases) == 1 else "mixed"
        sampling = _values(timed, SAMPLING_S)
        row[SAMPLING_ROW_KEY] = statistics.median(sampling) if sampling else None
        row[FINAL_LOSS] = losses_of(timed[0])[-1]
        row["repeats"] = {name: describe(_values(timed, figure))
                          for figure, name in REPEATS.items()}
        row[CI_LOW] = row["repeats"][REPEATS[MEDIAN_MS]].get("ci_low")
        row[CI_HIGH] = row["repeats"][REPEATS[MEDIAN_MS]].get("ci_high")
        row["warnings"] = instability_warnings(timed)
        if row.get(FLOPS_PER_STEP.key) and row.get(MEDIAN_MS.key):
            row[GFLOPS] = row[FLOPS_PER_STEP.key] / (row[MEDIAN_MS.key] * 1e-3) / 1e9
            if peak_gflops:
                row[PERCENT_OF_PEAK] = 100 * row[GFLOPS] / peak_gflops
        rows.append(row)
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    median = MEDIAN_MS.key
    by_config: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get(median):
            by_config.setdefault(row["config_key"], []).append(row)
    for timed in by_config.values():
        slowest = max(row[median] for row in timed)
        numpy_rows = {row["dtype"]: row for row in timed if row["backend"] == "numpy"}
        for row in timed:
            row[SPEEDUP_VS_SLOWEST] = slowest / row[median]
            # Against numpy at the same dtype when there is one, else any numpy row.
            numpy_row = numpy_rows.get(row["dtype"]) or next(iter(numpy_rows.values()), None)
            if numpy_row:
                row[SPEEDUP_VS_NUMPY] = numpy_row[median] / row[median]


def summary_notes(rows: list[dict]) -> list[str]:
    """Lines to print under a summary table: every warning, and how to get intervals where
    there was a single run."""
    notes = [f"{row['backend']} {row['dtype']}"
             + (f" ({row['config']})" if several_configs(rows) else "") + f": {warning}"
             for row in rows for warning in row.get("warnings", [])]
    if several_step_counts(rows):
        counts = sorted({row["steps"] for row in rows if row.get("steps")})
        notes.append(f"rows of different step counts share this table "
                     f"({', '.join(f'{count:,}' for count in counts)} steps; see the steps "
                     f"column): ms/step compares, but totals, end-to-end times and final "
                     f"losses do not, and each count has its own learning-rate schedule")
    if any(row.get("n") == 1 for row in rows):
        notes.append("single runs: no run-to-run spread or confidence interval; use --repeat 5 "
                     "(each repeat a fresh process) for numbers you can compare")
    return notes


def several_step_counts(rows: list[dict]) -> bool:
    return len({row.get("steps") for row in rows if row.get("steps")}) > 1


def several_configs(rows: list[dict]) -> bool:
    return len({row.get("config_key") for row in rows}) > 1
