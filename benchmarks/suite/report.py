"""Render the suite's results document as a Markdown report with its plots."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks.suite.cost import PROTOCOL_LABELS, PROTOCOLS
from benchmarks.suite.experiment import STATUS_FAILED, format_duration
from benchmarks.suite.machine import short_commit
from benchmarks.suite.privacy_attacks import epsilon_label
from benchmarks.suite.scaling import MIN_FIT_POINTS, metric_label

MISSING = "n/a"
ATTACK_LABELS = {"dlg": "DLG", "inverting_gradients": "IG"}


def format_value(value: Any, spec: str = "") -> str:
    """Format ``value`` with ``spec``, or return ``n/a`` for None."""
    if value is None:
        return MISSING
    return format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Return the lines of a Markdown table; numbers are right-aligned by caller."""
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def render_report(document: Mapping[str, Any]) -> str:
    """Return the Markdown report of a results document.

    Sections appear for the families that ran; plots are linked by file
    name, so the report must sit in the folder of its PNG files.
    """
    lines = _header(document)
    renderers: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
        "accuracy": _accuracy,
        "cost": _cost,
        "scaling": _scaling,
        "attacks": _attacks,
    }
    for family, render in renderers.items():
        section = document.get(family)
        if section is not None:
            lines.extend(["", *render(section)])
    return "\n".join(lines) + "\n"


def _header(document: Mapping[str, Any]) -> list[str]:
    suite = document["suite"]
    environment = document["environment"]
    machine = environment["machine"]
    packages = ", ".join(
        f"{name} {version}" for name, version in machine.get("packages", {}).items()
    )
    lines = [
        f"# Evaluation report ({suite['profile']})",
        "",
        f"- Command: `{suite['command']}`",
        f"- Started {suite['started_at']}, wall time "
        f"{format_duration(suite.get('wall_time_s') or 0.0)}; status "
        f"{suite['status']}.",
        f"- Machine: {machine.get('cpu_model')}, {machine.get('cores')} logical "
        f"cores, {machine.get('memory_gib')} GiB memory; Python "
        f"{machine.get('python')} on {machine.get('platform')}; {packages}.",
        f"- Commit: {short_commit(environment)}.",
        f"- Load average (1, 5, 15 min) at start: "
        f"{_load(environment.get('load_average'))}; at end: "
        f"{_load(document.get('environment_end', {}).get('load_average'))}. "
        "Other jobs on the machine slow every timed step.",
    ]
    lines.extend(f"- {note}" for note in suite.get("notes", []))
    failed = [
        entry
        for entry in document.get("failures", [])
        if entry.get("status") == STATUS_FAILED
    ]
    if failed:
        lines.extend(["", "Failed experiments:", ""])
        lines.extend(
            f"- {entry['family']}/{entry['name']}: {entry.get('error')}"
            for entry in failed
        )
    return lines


def _load(values: Sequence[float] | None) -> str:
    if values is None:
        return MISSING
    return ", ".join(f"{value:.2f}" for value in values)


def _images(section: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for name in section.get("plots", []):
        lines.extend(["", f"![{name}]({name})"])
    return lines


def _accuracy(section: Mapping[str, Any]) -> list[str]:
    lines = ["## Accuracy and convergence", "", section["description"]]
    for dataset, target in section["targets"].items():
        runs = [run for run in section["runs"] if run["config"]["dataset"] == dataset]
        if not runs:
            continue
        clients = runs[0]["config"]["num_supernodes"]
        lines.extend(
            [
                "",
                f"### {dataset} ({clients} clients, target accuracy {target:g})",
                "",
            ]
        )
        header = [
            "configuration",
            "security",
            "privacy",
            "partitioning",
            "final acc.",
            "best acc.",
            "mean acc. last 3",
            f"rounds to {target:g}",
            "final epsilon",
            "median s/round",
            "upload B/client/round",
            "download B/client/round",
        ]
        lines.extend(markdown_table(header, [_accuracy_row(run) for run in runs]))
        lines.extend(_verification(runs))
    skipped = section.get("skipped", [])
    if skipped:
        lines.extend(["", "Skipped configurations:", ""])
        lines.extend(f"- {entry['name']}: {entry['reason']}." for entry in skipped)
    lines.extend(_images(section))
    return lines


def _verification(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for run in runs:
        summary = run.get("summary")
        if not summary or not summary["checked_rounds"]:
            continue
        audit = summary["offline_audit_passed"]
        audit_text = {
            True: "passed",
            False: "failed",
            None: "not run (no audit.json)",
        }[audit]
        lines.append(
            f"- {run['config']['configuration']}: the clients verified "
            f"{summary['verified_rounds']} of {summary['checked_rounds']} "
            f"checked rounds; the offline audit (`python -m fedsec_flwr.audit`) "
            f"{audit_text}."
        )
    if not lines:
        return []
    return ["", "Verification of the aggregate:", "", *lines]


def _accuracy_row(run: Mapping[str, Any]) -> list[str]:
    config = run["config"]
    first = [
        config["configuration"],
        config["security"],
        config["privacy"],
        config["partitioning"],
    ]
    if run["status"] != "completed":
        return [*first, run["status"], *([MISSING] * 7)]
    summary = run["summary"]
    reached = summary["rounds_to_target"]
    return [
        *first,
        format_value(summary["final_accuracy"], ".3f"),
        format_value(summary["best_accuracy"], ".3f"),
        format_value(summary["last_rounds_mean_accuracy"], ".3f"),
        "not reached" if reached is None else str(reached),
        _epsilon_cell(summary),
        format_value(summary["median_round_seconds"], ".2f"),
        format_value(summary["upload_bytes_per_client"], ",.0f"),
        format_value(summary.get("download_bytes_per_client"), ",.0f"),
    ]


def _epsilon_cell(summary: Mapping[str, Any]) -> str:
    """Return the client-level epsilon, or else the per-example one of DP-SGD."""
    sample_epsilon = summary.get("final_sample_epsilon")
    if summary["final_epsilon"] is None and sample_epsilon is not None:
        return f"{sample_epsilon:.2f} (per example)"
    return format_value(summary["final_epsilon"], ".2f")


def _cost(section: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Cost per round",
        "",
        f"{section['description']} {section['clients']} clients.",
        "",
    ]
    header = [
        "parameters",
        *(f"{PROTOCOL_LABELS[name]} s/round" for name in PROTOCOLS),
        "fedsec overhead s",
        "Flower overhead s",
        "overhead ratio",
        *(f"{PROTOCOL_LABELS[name]} upload B" for name in PROTOCOLS),
    ]
    rows = [
        [
            f"{row['params']:,}",
            *(format_value(row[f"{name}_s_per_round"], ".3f") for name in PROTOCOLS),
            format_value(row["fedsec_overhead_s"], ".3f"),
            format_value(row["flower_overhead_s"], ".3f"),
            format_value(row["overhead_ratio"], ".2f"),
            *(
                format_value(row[f"{name}_upload_bytes_per_client"], ",.0f")
                for name in PROTOCOLS
            ),
        ]
        for row in section["rows"]
    ]
    lines.extend(markdown_table(header, rows))
    lines.extend(
        [
            "",
            "The overhead ratio is (fedsec - plain) / (Flower - plain); below 1 "
            "means fedsec adds less time than Flower's SecAgg+.",
        ]
    )
    if section.get("missing_points"):
        lines.append(f"Not measured: {', '.join(section['missing_points'])}.")
    lines.extend(["", *_breakdown(section["round_breakdown"])])
    lines.extend(_images(section))
    return lines


def _breakdown(breakdown: Mapping[str, Any]) -> list[str]:
    lines = ["### Where a round's time goes (accuracy runs, with training)", ""]
    lines.append(breakdown["note"])
    rows = breakdown["rows"]
    if not rows:
        lines.extend(["", "No accuracy run completed, so there is no split."])
        return lines
    # Stages keep the order in which the app reports them, the protocol order.
    stage_names = list(dict.fromkeys(name for row in rows for name in row["stages"]))
    client_names = list(
        dict.fromkeys(name for row in rows for name in row.get("client_stages", {}))
    )
    header = [
        "run",
        "security",
        "privacy",
        "median s/round",
        *stage_names,
        *(f"{name} (per client)" for name in client_names),
    ]
    table = [
        [
            row["name"],
            row["security"],
            row["privacy"],
            format_value(row["median_round_seconds"], ".3f"),
            *(format_value(row["stages"].get(name), ".3f") for name in stage_names),
            *(
                format_value(row["client_stages"].get(name), ".4f")
                for name in client_names
            ),
        ]
        for row in rows
    ]
    lines.extend(["", *markdown_table(header, table)])
    return lines


def _scaling(section: Mapping[str, Any]) -> list[str]:
    lines = ["## Scaling", "", section["description"]]
    for axis, title in (("clients", "clients"), ("params", "model parameters")):
        data = section.get(f"{axis}_axis")
        if data is None:
            continue
        fixed = ", ".join(f"{key} {value:,}" for key, value in data["fixed"].items())
        lines.extend(["", f"### Growth with {title} ({fixed})", ""])
        header = [
            axis,
            *(f"{PROTOCOL_LABELS[name]} s/round" for name in PROTOCOLS),
            *(f"{PROTOCOL_LABELS[name]} upload B" for name in PROTOCOLS),
        ]
        rows = [
            [
                f"{row[axis]:,}",
                *(
                    format_value(row[f"{name}_s_per_round"], ".3f")
                    for name in PROTOCOLS
                ),
                *(
                    format_value(row[f"{name}_upload_bytes_per_client"], ",.0f")
                    for name in PROTOCOLS
                ),
            ]
            for row in data["rows"]
        ]
        lines.extend([*markdown_table(header, rows), ""])
        lines.extend(_fits(data))
        if data.get("missing_points"):
            lines.extend(["", f"Not measured: {', '.join(data['missing_points'])}."])
    lines.extend(_images(section))
    return lines


def _fits(data: Mapping[str, Any]) -> list[str]:
    if len(data["rows"]) < MIN_FIT_POINTS:
        return [
            f"A growth exponent needs at least {MIN_FIT_POINTS} sizes; this axis "
            f"has {len(data['rows'])}."
        ]
    rows = []
    for fit in data["fits"]:
        label = metric_label(fit["metric"])
        if "exponent" in fit:
            rows.append(
                [
                    label,
                    f"{fit['exponent']:.2f}",
                    format_value(fit["r_squared"], ".3f"),
                    str(fit["num_points"]),
                ]
            )
        else:
            rows.append(
                [label, MISSING, MISSING, f"{fit['num_points']}: {fit['reason']}"]
            )
    return markdown_table(
        ["cost", "growth exponent", "R squared (log-log)", "points"], rows
    )


def _attacks(section: Mapping[str, Any]) -> list[str]:
    lines = ["## Privacy against attacks", "", section["description"]]
    inversion = section.get("gradient_inversion")
    if inversion is not None:
        lines.extend(["", "### Gradient inversion", ""])
        lines.extend(_inversion(inversion))
    membership = section.get("membership_inference")
    if membership is not None:
        lines.extend(["", "### Membership inference", ""])
        lines.extend(_membership(membership))
    lines.extend(_images(section))
    return lines


def _inversion(entry: Mapping[str, Any]) -> list[str]:
    if entry["status"] != "completed":
        return [f"Failed: {entry.get('error')}"]
    config = entry["resolved_config"]
    iterations = config["iterations"]
    lines = [
        f"{config['num_images']} target images of the untrained inversion CNN; "
        f"DLG runs {iterations['dlg']} L-BFGS iterations and IG (Inverting "
        f"Gradients) {iterations['inverting_gradients']} Adam steps. The secure "
        f"aggregate is the mean gradient of {config['num_clients']} clients; a "
        f"DP view clips the client's gradient to norm {config['clipping_norm']:g} "
        "and adds Gaussian noise of standard deviation z times that norm.",
        "",
    ]
    header = ["view"]
    for label in ATTACK_LABELS.values():
        header.extend([f"{label} PSNR dB", f"{label} SSIM", f"{label} label right"])
    rows = []
    for view in entry["views"]:
        row = [view["name"]]
        for attack in ATTACK_LABELS:
            result = view["attacks"][attack]
            labels = result["label_correct"]
            row.extend(
                [
                    "inf"
                    if result["mean_psnr"] is None
                    else f"{result['mean_psnr']:.1f}",
                    f"{result['mean_ssim']:.3f}",
                    f"{sum(labels)}/{len(labels)}",
                ]
            )
        rows.append(row)
    lines.extend(markdown_table(header, rows))
    return lines


def _membership(entry: Mapping[str, Any]) -> list[str]:
    if entry["status"] != "completed":
        return [f"Failed: {entry.get('error')}"]
    config = entry["resolved_config"]
    training = config["training"]
    lines = [
        f"{config['num_members']} members and {config['num_non_members']} "
        f"non-members of Fashion-MNIST, {config['num_shadows']} shadow models per "
        f"epsilon, an MLP trained {training['epochs']} epochs (batch "
        f"{training['batch_size']}, clipping norm {training['max_grad_norm']:g}, "
        f"delta {training['delta']:g}).",
        "",
    ]

    results = entry["results"]
    attacks = list(results[0]["attacks"]) if results else []
    header = ["DP-SGD", "spent epsilon", "noise multiplier", "train acc.", "test acc."]
    for attack in attacks:
        header.extend([f"{attack} AUC", f"{attack} TPR@1%FPR"])

    rows = [_membership_row(result, attacks) for result in results]
    lines.extend(markdown_table(header, rows))
    return lines


def _membership_row(result: Mapping[str, Any], attacks: Sequence[str]) -> list[str]:
    row = [
        epsilon_label(result["target_epsilon"]),
        format_value(result["spent_epsilon"], ".2f"),
        format_value(result["noise_multiplier"], ".2f"),
        format_value(result["train_accuracy"], ".3f"),
        format_value(result["test_accuracy"], ".3f"),
    ]
    for attack in attacks:
        scores = result["attacks"][attack]
        row.append(format_value(scores["auc"], ".3f"))
        row.append(format_value(scores["tpr_at_1pct_fpr"], ".3f"))
    return row
