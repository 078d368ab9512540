"""Privacy by attack: gradient inversion and membership inference on Fashion-MNIST.

Both experiments come from ``benchmarks.attacks.experiment``. Gradient
inversion reconstructs a client's image from what the server receives: one
client's plaintext gradient, the mean of many clients' gradients (what
secure aggregation reveals), and a clipped, noised gradient (DP). Membership
inference scores, for models trained without and with DP-SGD, how well an
attacker tells training examples from others (AUC, and the true-positive
rate at 1% false positives).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.suite.experiment import (
    ATTACKS,
    STATUS_COMPLETED,
    Experiment,
    json_safe,
)
from benchmarks.suite.plots import FONT_SIZE, new_figure, save_png
from benchmarks.suite.profiles import AttackPlan

GRADIENT_INVERSION = "gradient-inversion"
MEMBERSHIP_INFERENCE = "membership-inference"
RECONSTRUCTIONS_FIGURE = "reconstructions.png"
MEMBERSHIP_FIGURE = "membership-inference.png"
# Image arrays stay in the figure; results.json keeps the scores only.
IMAGE_KEYS = ("originals", "reconstructions")
NO_DP_LABEL = "no DP"


def plan_experiments(plan: AttackPlan, *, out_dir: Path) -> list[Experiment]:
    """Build the gradient-inversion and membership-inference experiments."""
    membership_config = {
        **plan.membership_inference,
        "training_epochs": plan.membership_epochs,
    }
    return [
        Experiment(
            family=ATTACKS,
            name=GRADIENT_INVERSION,
            config=json_safe(plan.gradient_inversion),
            run=lambda: run_gradient_inversion(plan, out_dir / RECONSTRUCTIONS_FIGURE),
            headline=_inversion_headline,
        ),
        Experiment(
            family=ATTACKS,
            name=MEMBERSHIP_INFERENCE,
            config=json_safe(membership_config),
            run=lambda: run_membership_inference(plan),
            headline=_membership_headline,
        ),
    ]


def run_gradient_inversion(plan: AttackPlan, figure_path: Path) -> dict[str, Any]:
    """Run DLG and Inverting Gradients on every view and save the figure."""
    from benchmarks.attacks import experiment

    _silence_known_warnings()
    result = experiment.run_gradient_inversion(**plan.gradient_inversion)
    experiment.save_reconstruction_figure(result, figure_path)
    return {**_rename_config(strip_images(result)), "figure": figure_path.name}


def run_membership_inference(plan: AttackPlan) -> dict[str, Any]:
    """Train target and shadow models at each epsilon and attack them."""
    from benchmarks.attacks import experiment
    from benchmarks.attacks.fashion_mnist import load_fashion_mnist

    _silence_known_warnings()
    training = experiment.TrainingConfig(epochs=plan.membership_epochs)
    result = experiment.run_membership_inference(
        experiment.membership_mlp,
        load_fashion_mnist(split="train"),
        load_fashion_mnist(split="test"),
        training=training,
        **plan.membership_inference,
    )
    return _rename_config(json_safe(result))


def _rename_config(result: dict[str, Any]) -> dict[str, Any]:
    # The experiment's own "config" holds every resolved setting; it is kept
    # apart from the suite's "config", which holds the requested ones.
    renamed = dict(result)
    renamed["resolved_config"] = renamed.pop("config", None)
    return renamed


def _silence_known_warnings() -> None:
    # Opacus warns on every PrivacyEngine that its secure RNG is off, which
    # an evaluation does not need, and torch warns that the inputs need no
    # gradient; both would bury the progress lines.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")


def strip_images(value: Any) -> Any:
    """Return a copy of ``value`` without the image arrays under ``IMAGE_KEYS``."""
    if isinstance(value, Mapping):
        return {
            key: strip_images(item)
            for key, item in value.items()
            if key not in IMAGE_KEYS
        }
    if isinstance(value, list | tuple):
        return [strip_images(item) for item in value]
    return value


def _inversion_headline(entry: dict[str, Any]) -> str:
    parts = []
    for view in entry["views"]:
        psnr = view["attacks"]["inverting_gradients"]["mean_psnr"]
        psnr_text = "inf" if psnr is None else f"{psnr:.1f}"
        parts.append(f"{view['name']} {psnr_text} dB")
    return "IG mean PSNR: " + ", ".join(parts)


def _membership_headline(entry: dict[str, Any]) -> str:
    parts = []
    for result in entry["results"]:
        auc = result["attacks"]["lira_offline"]["auc"]
        parts.append(f"{epsilon_label(result['target_epsilon'])} AUC {auc:.3f}")
    return "LiRA offline: " + ", ".join(parts)


def epsilon_label(epsilon: float | None) -> str:
    """Return ``no DP`` for None (training without DP), else ``eps=<value>``."""
    return NO_DP_LABEL if epsilon is None else f"eps={epsilon:g}"


def summarize(
    entries: Sequence[Mapping[str, Any]],
    *,
    out_dir: Path,
    environment: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the attacks section: both experiments and their plots."""
    by_name = {entry["name"]: dict(entry) for entry in entries}
    plots = []
    inversion = by_name.get(GRADIENT_INVERSION)
    if inversion is not None and inversion["status"] == STATUS_COMPLETED:
        plots.append(inversion["figure"])
    membership = by_name.get(MEMBERSHIP_INFERENCE)
    if membership is not None and membership["status"] == STATUS_COMPLETED:
        plots.append(plot_membership(membership, out_dir / MEMBERSHIP_FIGURE))
    return {
        "description": (
            "Gradient inversion: PSNR (dB) and SSIM of the reconstruction "
            "against the client's image, higher means more leaked. Membership "
            "inference: AUC (0.5 is guessing) and TPR at 1% FPR of attacks on "
            "models trained with DP-SGD at each epsilon (delta 1e-5)."
        ),
        "gradient_inversion": inversion,
        "membership_inference": membership,
        "plots": plots,
        **environment,
    }


def plot_membership(entry: Mapping[str, Any], path: Path) -> str:
    """Plot AUC and TPR at 1% FPR of each attack against the target epsilon."""
    results = entry["results"]
    labels = [epsilon_label(result["target_epsilon"]) for result in results]
    attacks = list(results[0]["attacks"]) if results else []
    figure = new_figure(8.0, 3.4)
    panels = (("auc", "AUC", 0.5), ("tpr_at_1pct_fpr", "TPR at 1% FPR", 0.01))
    for index, (key, title, chance) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, 2, index)
        for attack in attacks:
            axis.plot(
                labels,
                [result["attacks"][attack][key] for result in results],
                marker="o",
                label=attack,
            )
        axis.axhline(chance, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xlabel("DP-SGD target epsilon")
        axis.set_ylabel(title)
        axis.set_title(f"{title} (dashed: random guess)", fontsize=FONT_SIZE + 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=FONT_SIZE - 1)
    return save_png(figure, path)
