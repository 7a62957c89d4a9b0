"""Plot the ground-truth weight w_y against pi_y for both positive-reward forms.

The curves are computed by ``precision_ce.reference.target_weight`` itself (float64), so the
figure shows what the torch backend evaluates, clamps included:

    power:  w_y = pi_y ** (1 - (1 - pi_y) ** beta)
    focal:  w_y = (1 - pi_y) ** beta

Run from the repository root:  python docs/figures/plot_target_weight.py
It writes docs/figures/target_weight.png next to this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import NullFormatter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for running without installing

from precision_ce.reference import target_weight  # noqa: E402

BETAS: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
DEFAULT_OUT = HERE / "target_weight.png"


def pi_grid(points: int = 4001) -> torch.Tensor:
    """pi_y in (0, 1), uniform in the logit of pi_y so both ends are resolved (float64)."""
    logit = torch.linspace(-10.0, 14.0, points, dtype=torch.float64)
    return torch.sigmoid(logit)


def weight_curve(pi: torch.Tensor, beta: float, form: str) -> np.ndarray:
    """w_y(pi_y) from the reference implementation, with log(1 - pi_y) = log1p(-pi_y)."""
    w_y, _, _ = target_weight(torch.log(pi), torch.log1p(-pi), beta, form)
    return w_y.numpy()


def beta_color(beta: float) -> tuple[float, float, float, float] | str:
    """Blues for beta < 0 (precision), black for cross-entropy, reds for beta > 0 (diversity)."""
    if beta == 0.0:
        return "black"
    if beta < 0.0:
        return plt.get_cmap("Blues")(0.45 + 0.9 * min(-beta, 0.5))
    return plt.get_cmap("Reds")(0.35 + 0.6 * min(beta, 1.0))


def plot(out: Path) -> None:
    """Draw the two panels (power, focal) and save them to ``out``."""
    pi = pi_grid()
    x = pi.numpy()
    fig, (ax_power, ax_focal) = plt.subplots(1, 2, figsize=(11.5, 4.9), constrained_layout=True)

    for beta in BETAS:
        style = {
            "color": beta_color(beta),
            "lw": 2.2 if beta == 0.0 else 1.8,
            "ls": "--" if beta == 0.0 else "-",
        }
        label = r"$\beta = 0$ (cross-entropy)" if beta == 0.0 else rf"$\beta = {beta:g}$"
        ax_power.plot(x, weight_curve(pi, beta, "power"), label=label, **style)
        ax_focal.plot(x, weight_curve(pi, beta, "focal"), **style)

    ax_power.set_title(r'"power" (default):  $w_y = \pi_y^{\,1-(1-\pi_y)^{\beta}}$')
    ax_power.set_xlim(0.0, 1.0)
    ax_power.set_ylim(0.6, 1.4)
    ax_power.text(
        0.5,
        0.04,
        r"$w_y \to 1$ as $\pi_y \to 0$ and as $\pi_y \to 1$, for every $\beta > -1$",
        transform=ax_power.transAxes,
        ha="center",
        fontsize=9,
        color="0.3",
    )

    ax_focal.set_title(r'"focal":  $w_y = (1-\pi_y)^{\beta}$   (log $y$, logit-scaled $x$)')
    ax_focal.set_xscale("logit")
    ax_focal.set_xlim(1e-3, 1.0 - 1e-6)
    ticks = [1e-3, 1e-2, 0.1, 0.5, 0.9, 0.99, 1.0 - 1e-4, 1.0 - 1e-6]
    ax_focal.set_xticks(ticks, ["0.001", "0.01", "0.1", "0.5", "0.9", "0.99", "1-1e-4", "1-1e-6"])
    ax_focal.xaxis.set_minor_formatter(NullFormatter())
    ax_focal.set_yscale("log")
    ax_focal.set_ylim(1e-4, 1e4)
    ax_focal.text(
        0.03,
        0.96,
        r"$\beta<0$: $w_y \to \infty$ as $\pi_y \to 1$, but the gradient factor"
        "\n"
        r"$w_y\,(1-\pi_y) = (1-\pi_y)^{1+\beta} \to 0$ while $\beta > -1$",
        transform=ax_focal.transAxes,
        va="top",
        fontsize=9,
        color="0.3",
    )

    for ax in (ax_power, ax_focal):
        ax.set_xlabel(r"$\pi_y$ (model probability of the ground-truth token)")
        ax.set_ylabel(r"ground-truth weight $w_y = \pi_y\, r_{pos}$")
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=len(BETAS), fontsize=9, frameon=False)
    fig.suptitle(
        r"Ground-truth weight $w_y$ vs. $\pi_y$ (precision_ce.reference.target_weight, float64): "
        r"$\beta<0$ amplifies (precision), $\beta>0$ attenuates (diversity)",
        fontsize=11,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``--out`` overrides the output path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG path to write")
    args = parser.parse_args(argv)
    plot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
