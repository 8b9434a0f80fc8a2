"""Figures of sample quality (matplotlib, headless): energy histograms, Ramachandran free energies, contact maps.

Each function returns a ``matplotlib.figure.Figure``; callers save or log it and close it.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bg.sampling.ess import normalised_weights  # noqa: E402


def _np(t: Tensor | np.ndarray) -> np.ndarray:
    return t.detach().double().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t, dtype=np.float64)


def _weights(log_w: Tensor | np.ndarray) -> np.ndarray:
    return normalised_weights(torch.as_tensor(_np(log_w))).numpy()


def _density_hist(ax, values: np.ndarray, bins: np.ndarray, weights: np.ndarray | None = None, **kwargs) -> None:
    """``ax.hist(..., density=True)`` of the values inside the bins; nothing drawn when none is (or none
    weighs anything), instead of numpy's division by a zero total (e.g. every sample of a clashing flow
    beyond the range)."""
    inside = (values >= bins[0]) & (values <= bins[-1])
    w = None if weights is None else weights[inside]
    if not inside.any() or (w is not None and w.sum() <= 0):
        return
    ax.hist(values[inside], bins=bins, weights=w, density=True, **kwargs)


def energy_histogram(u_data: Tensor, u_gen: Tensor, log_w: Tensor | None = None, title: str = "",
                     others: dict[str, Tensor] | None = None) -> plt.Figure:
    """Histogram of reduced energies (kT): MD data, generated samples and, with ``log_w``, generated
    samples reweighted to the Boltzmann distribution; ``others`` adds further (equally weighted) sets,
    e.g. ``{"SMC": u_smc}``. The range covers the data and the bulk of the samples; the fraction of
    samples beyond it is printed in the legend."""
    ud, ug = _np(u_data), _np(u_gen)
    ud, fin = ud[np.isfinite(ud)], np.isfinite(ug)
    lo = min(np.quantile(ud, 0.001), np.quantile(ug[fin], 0.01) if fin.any() else np.inf)
    hi = np.quantile(ud, 0.999) + 0.5 * (np.quantile(ud, 0.999) - np.quantile(ud, 0.001))
    bins = np.linspace(lo, hi, 80)
    fig, ax = plt.subplots(figsize=(6, 4))
    _density_hist(ax, ud, bins, histtype="stepfilled", alpha=0.35, color="gray", label="MD data")
    outside = float(((ug > hi) | ~fin).mean())
    _density_hist(ax, ug[fin], bins, histtype="step", lw=1.5, color="C0",
                  label=f"generated ({outside:.0%} beyond range)")
    if log_w is not None:
        _density_hist(ax, ug[fin], bins, weights=_weights(log_w)[fin], histtype="step", lw=1.5, color="C3",
                      label="reweighted")
    for k, (name, u) in enumerate((others or {}).items()):
        uo = _np(u)
        fo = np.isfinite(uo)
        _density_hist(ax, uo[fo], bins, histtype="step", lw=1.5, color=f"C{k + 4}",
                      label=f"{name} ({float(((uo > hi) | ~fo).mean()):.0%} beyond range)")
    ax.set_xlabel("energy u (kT)")
    ax.set_ylabel("density")
    ax.set_title(title or "sample energies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _free_energy(phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None, bins: int) -> np.ndarray:
    h, _, _ = np.histogram2d(phi, psi, bins=bins, range=[[-math.pi, math.pi], [-math.pi, math.pi]], weights=weights)
    with np.errstate(divide="ignore"):
        f = -np.log(h / max(h.sum(), 1e-300))
    return f - np.min(f[np.isfinite(f)]) if np.isfinite(f).any() else f


def ramachandran(sets: dict[str, tuple[Tensor, Tensor, Tensor | None]], residue_labels: list[str] | None = None,
                 bins: int = 60, max_free_energy: float = 8.0, max_residues: int = 6) -> plt.Figure:
    """Per-residue Ramachandran free-energy maps, −log p(φ, ψ) in kT, one column per data set.

    Args:
        sets: name → (φ ``(B, R)``, ψ ``(B, R)``, log weights ``(B,)`` or None), e.g. ``{"MD data":
            (φ, ψ, None), "generated": (φ, ψ, None), "reweighted": (φ, ψ, log_w)}``.
        residue_labels: names of the R residues (rows).
        max_residues: plot at most this many residues (evenly spread along the chain).
    """
    first = next(iter(sets.values()))[0]
    n_res = first.shape[1]
    rows = np.unique(np.linspace(0, n_res - 1, min(n_res, max_residues)).round().astype(int))
    fig, axes = plt.subplots(len(rows), len(sets), figsize=(3.1 * len(sets), 2.9 * len(rows)), squeeze=False)
    ticks = [-math.pi, 0, math.pi]
    for c, (name, (phi, psi, log_w)) in enumerate(sets.items()):
        p, s = _np(phi), _np(psi)
        w = _weights(log_w) if log_w is not None else None
        ok = np.isfinite(p).all(1) & np.isfinite(s).all(1)
        for r_i, r in enumerate(rows):
            ax = axes[r_i, c]
            f = _free_energy(p[ok, r], s[ok, r], w[ok] if w is not None else None, bins)
            im = ax.imshow(np.clip(f, 0, max_free_energy).T, origin="lower", extent=[-math.pi, math.pi, -math.pi, math.pi],
                           cmap="viridis", vmin=0, vmax=max_free_energy, aspect="equal")
            ax.set_xticks(ticks, ["−π", "0", "π"])
            ax.set_yticks(ticks, ["−π", "0", "π"])
            label = residue_labels[r] if residue_labels else f"residue {r}"
            ax.set_title(f"{name}: {label}", fontsize=8)
            if r_i == len(rows) - 1:
                ax.set_xlabel("φ")
            if c == 0:
                ax.set_ylabel("ψ")
    fig.colorbar(im, ax=axes, shrink=0.6, label="free energy (kT)")
    return fig


def free_energy_surface(surface, max_free_energy: float = 8.0) -> plt.Figure:
    """A :class:`bg.report.Surface`: 1-D profiles with ±1σ bands per sample set, or 2-D maps (one per set,
    kT, lowest bin 0) with the generator − reference difference and the generator's per-bin error."""
    keys = list(surface.values)
    if len(surface.edges) == 1:
        e = np.asarray(surface.edges[0])
        mid = 0.5 * (e[1:] + e[:-1])
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for k, key in enumerate(keys):
            f, err = surface.values[key], surface.errors[key]
            ok = np.isfinite(f) & np.isfinite(err)
            ax.plot(mid[ok], f[ok], color=f"C{k}", label=key)
            ax.fill_between(mid[ok], (f - err)[ok], (f + err)[ok], color=f"C{k}", alpha=0.25)
        ax.set_xlabel(surface.name)
        ax.set_ylabel("free energy (kT)")
        ax.set_ylim(-0.5, max_free_energy)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    ex, ey = (np.asarray(e) for e in surface.edges)
    extent = [ex[0], ex[-1], ey[0], ey[-1]]
    # empty bins (F = +inf) stay white
    panels = [(key, np.where(np.isfinite(surface.values[key]), surface.values[key], np.nan), "viridis",
               (0, max_free_energy)) for key in keys]
    if "generator" in surface.values and "reference" in surface.values:
        with np.errstate(invalid="ignore"):  # inf − inf where both sets left a bin empty
            diff = surface.values["generator"] - surface.values["reference"]
        panels.append(("generator − reference", np.where(np.isfinite(diff), diff, np.nan), "RdBu_r", (-2, 2)))
    if "generator" in surface.errors:
        err = surface.errors["generator"]
        panels.append(("generator ±1σ", np.where(np.isfinite(err), err, np.nan), "magma", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False)
    for ax, (title, f, cmap, (lo, hi)) in zip(axes[0], panels):
        im = ax.imshow(np.clip(f, lo, hi).T, origin="lower", extent=extent, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_title(f"{surface.name}: {title}", fontsize=8)
        ax.set_xlabel("φ" if "phi" in surface.name else "x")
        ax.set_ylabel("ψ" if "phi" in surface.name else "y")
        fig.colorbar(im, ax=ax, shrink=0.8, label="kT")
    fig.tight_layout()
    return fig


def contact_maps(contacts: dict[str, np.ndarray], residues: list[str], cutoff: float) -> plt.Figure:
    """Residue contact probabilities ``(R, R)`` per sample set (e.g. generator, reweighted, reference) and
    each set − reference difference; residues labelled along the axes (every ⌈R/12⌉-th)."""
    keys = [k for k in contacts if k != "reference"]
    panels = [(k, contacts[k], "Greys", (0, 1)) for k in (*keys, "reference") if k in contacts]
    if "reference" in contacts:
        panels += [(f"{k} − reference", contacts[k] - contacts["reference"], "RdBu_r", (-1, 1)) for k in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.3), squeeze=False)
    step = max(1, math.ceil(len(residues) / 12))
    ticks = np.arange(0, len(residues), step)
    for ax, (title, m, cmap, (lo, hi)) in zip(axes[0], panels):
        im = ax.imshow(m, origin="lower", cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=8)
        ax.set_xticks(ticks, [residues[i] for i in ticks], rotation=90, fontsize=5)
        ax.set_yticks(ticks, [residues[i] for i in ticks], fontsize=5)
        fig.colorbar(im, ax=ax, shrink=0.8, label="p(contact)" if lo == 0 else "Δp")
    fig.suptitle(f"Cα–Cα contacts (< {cutoff:g} nm)", fontsize=9)
    fig.tight_layout()
    return fig


def close(fig: plt.Figure) -> None:
    plt.close(fig)


__all__ = ["close", "contact_maps", "energy_histogram", "free_energy_surface", "ramachandran"]
