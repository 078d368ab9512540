"""Scaling: how each cost grows with the number of clients and of parameters.

The family measures two axes with the points of ``benchmarks.suite.cost``:
clients at a fixed model size, and model size at a fixed client count. For
every cost on an axis it fits ``cost = coefficient * size ** exponent`` by
least squares on log-log axes and reports the exponent: 1 means linear
growth, 0 no growth. SecAgg+ predicts per-client work of O(log n + d) for n
clients and d parameters (Bell et al., CCS 2020), so a client's upload should
stay nearly flat in n and grow linearly in d.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.suite.cost import (
    PROTOCOL_LABELS,
    PROTOCOLS,
    Point,
    cost_row,
    measured_points,
)
from benchmarks.suite.plots import FONT_SIZE, new_figure, save_png
from benchmarks.suite.profiles import ScalingPlan

MIN_FIT_POINTS = 2
CLIENTS_AXIS = "clients"
PARAMS_AXIS = "params"


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares line through ``(log x, log y)``.

    Attributes:
        exponent: Slope on log-log axes: ``y`` grows as ``x ** exponent``.
        coefficient: ``y`` at ``x = 1`` on the fitted line.
        r_squared: Coefficient of determination on log-log axes, or None
            when every ``y`` is equal.
        num_points: Points in the fit.
    """

    exponent: float
    coefficient: float
    r_squared: float | None
    num_points: int

    def predict(self, x: float) -> float:
        """Return the fitted ``y`` at ``x``."""
        return float(self.coefficient * x**self.exponent)


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> PowerLawFit:
    """Fit ``y = coefficient * x ** exponent`` by least squares in log space.

    Args:
        xs: Sizes, all positive, at least two distinct.
        ys: Costs at those sizes, all positive.

    Returns:
        The fitted exponent, coefficient and R squared.

    Raises:
        ValueError: If the lengths differ, there are fewer than two points,
            a value is not positive and finite, or all ``xs`` are equal.
    """
    if len(xs) != len(ys):
        raise ValueError(
            f"xs and ys must have the same length. Found {len(xs)} and {len(ys)}."
        )
    if len(xs) < MIN_FIT_POINTS:
        raise ValueError(
            f"A fit needs at least {MIN_FIT_POINTS} points. Found {len(xs)}."
        )
    for name, values in (("xs", xs), ("ys", ys)):
        bad = [value for value in values if not (math.isfinite(value) and value > 0)]
        if bad:
            raise ValueError(f"{name} must be positive and finite. Found {bad[0]!r}.")
    if len(set(xs)) < MIN_FIT_POINTS:
        raise ValueError(f"xs must contain at least two distinct values. Found {xs}.")

    log_x = np.log(np.asarray(xs, dtype=np.float64))
    log_y = np.log(np.asarray(ys, dtype=np.float64))
    slope, intercept = np.polyfit(log_x, log_y, 1)

    residual = float(np.sum((log_y - (slope * log_x + intercept)) ** 2))
    total = float(np.sum((log_y - log_y.mean()) ** 2))
    r_squared = None if total == 0.0 else 1.0 - residual / total
    return PowerLawFit(
        exponent=float(slope),
        coefficient=float(math.exp(intercept)),
        r_squared=r_squared,
        num_points=len(xs),
    )


def axis_points(plan: ScalingPlan) -> dict[str, list[Point]]:
    """Return the points of the clients axis and of the parameters axis."""
    return {
        CLIENTS_AXIS: [
            Point(clients, plan.clients_axis_params, plan.rounds)
            for clients in plan.clients
        ],
        PARAMS_AXIS: [
            Point(plan.params_axis_clients, params, plan.rounds)
            for params in plan.params
        ],
    }


METRIC_SUFFIX_LABELS = {
    "s_per_round": "s/round",
    "upload_bytes_per_client": "upload bytes per client",
}
OTHER_METRIC_LABELS = {
    "fedsec_overhead_s": "fedsec overhead s/round (over plain)",
    "flower_overhead_s": "Flower overhead s/round (over plain)",
    "fedsec_mask_ms": "fedsec mask generation ms",
    "flower_mask_ms": "Flower mask generation ms",
}


def metric_label(metric: str) -> str:
    """Return the table label of a fitted cost, such as ``fedsec SecAgg+ s/round``."""
    if metric in OTHER_METRIC_LABELS:
        return OTHER_METRIC_LABELS[metric]
    for name in PROTOCOLS:
        for suffix, label in METRIC_SUFFIX_LABELS.items():
            if metric == f"{name}_{suffix}":
                return f"{PROTOCOL_LABELS[name]} {label}"
    return metric


def _metrics(axis: str) -> dict[str, Callable[[Mapping[str, Any]], float | None]]:
    metrics: dict[str, Callable[[Mapping[str, Any]], float | None]] = {}
    for name in PROTOCOLS:
        metrics[f"{name}_s_per_round"] = _column(f"{name}_s_per_round")
        metrics[f"{name}_upload_bytes_per_client"] = _column(
            f"{name}_upload_bytes_per_client"
        )
    metrics["fedsec_overhead_s"] = _column("fedsec_overhead_s")
    metrics["flower_overhead_s"] = _column("flower_overhead_s")
    if axis == PARAMS_AXIS:
        metrics["fedsec_mask_ms"] = _column("fedsec_mask_ms")
        metrics["flower_mask_ms"] = _column("flower_mask_ms")
    return metrics


def _column(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def read(row: Mapping[str, Any]) -> float | None:
        value = row.get(key)
        return None if value is None else float(value)

    return read


def fit_axis(rows: Sequence[Mapping[str, Any]], axis: str) -> list[dict[str, Any]]:
    """Fit every cost of one axis; a cost without two valid points gets a reason.

    A point is left out of a fit when its value is missing or not positive,
    as an overhead is when the secure protocol was no slower than plain
    FedAvg at that size.
    """
    fits = []
    for metric, read in _metrics(axis).items():
        pairs = [
            (float(row[axis]), value)
            for row in rows
            if (value := read(row)) is not None and value > 0
        ]
        record: dict[str, Any] = {"metric": metric, "num_points": len(pairs)}
        try:
            fit = fit_power_law([x for x, _ in pairs], [y for _, y in pairs])
        except ValueError as error:
            record["reason"] = str(error)
        else:
            record.update(asdict(fit))
        fits.append(record)
    return fits


def summarize(
    entries: Sequence[Mapping[str, Any]],
    *,
    plan: ScalingPlan,
    out_dir: Path,
    environment: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the scaling section: rows and fits of both axes, and plots."""
    measured = measured_points(entries)
    section: dict[str, Any] = {
        "description": (
            "exponent is the least-squares slope of log(cost) on log(size); "
            "a cost grows as size ** exponent."
        ),
        "plots": [],
    }
    fixed = {
        CLIENTS_AXIS: {"params": plan.clients_axis_params},
        PARAMS_AXIS: {"clients": plan.params_axis_clients},
    }
    for axis, points in axis_points(plan).items():
        rows = [
            cost_row(point, measured[point]) for point in points if point in measured
        ]
        fits = fit_axis(rows, axis)
        section[f"{axis}_axis"] = {
            "fixed": fixed[axis],
            "rows": rows,
            "missing_points": [p.name for p in points if p not in measured],
            "fits": fits,
        }
        if rows:
            section["plots"].append(
                plot_axis(rows, fits, axis, out_dir / f"scaling-{axis}.png")
            )
    section.update(environment)
    return section


def plot_axis(
    rows: Sequence[Mapping[str, Any]],
    fits: Sequence[Mapping[str, Any]],
    axis: str,
    path: Path,
) -> str:
    """Plot seconds per round and upload per client against one size, log-log.

    Measured points are markers; the fitted power laws are dashed lines with
    the exponent in the legend.
    """
    figure = new_figure(9.0, 3.6)
    fits_by_metric = {fit["metric"]: fit for fit in fits}
    sizes = [float(row[axis]) for row in rows]
    panels = (
        ("s_per_round", "seconds per round"),
        ("upload_bytes_per_client", "upload bytes per client per round"),
    )
    for index, (suffix, ylabel) in enumerate(panels, start=1):
        panel = figure.add_subplot(1, 2, index)
        for name in PROTOCOLS:
            metric = f"{name}_{suffix}"
            values = [row[metric] for row in rows]
            fit = fits_by_metric.get(metric, {})
            label = PROTOCOL_LABELS[name]
            if "exponent" in fit:
                label = f"{label} (exponent {fit['exponent']:.2f})"
            line = panel.plot(sizes, values, marker="o", linestyle="none", label=label)
            if "exponent" in fit:
                fitted = PowerLawFit(
                    exponent=fit["exponent"],
                    coefficient=fit["coefficient"],
                    r_squared=fit["r_squared"],
                    num_points=fit["num_points"],
                )
                curve = [fitted.predict(size) for size in sizes]
                panel.plot(sizes, curve, linestyle="--", color=line[0].get_color())
        panel.set_xscale("log")
        panel.set_yscale("log")
        panel.set_xlabel(_axis_label(axis, rows))
        panel.set_ylabel(ylabel)
        panel.grid(alpha=0.3, which="both")
        panel.legend(fontsize=FONT_SIZE - 1)
    return save_png(figure, path)


def _axis_label(axis: str, rows: Sequence[Mapping[str, Any]]) -> str:
    if axis == CLIENTS_AXIS:
        return f"clients ({rows[0]['params']:,} parameters)"
    return f"model parameters ({rows[0]['clients']} clients)"
