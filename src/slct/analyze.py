"""The paper's section 4.1 as a tool: impulsive outliers in latent data and in the temporal difference.

For a latent dataset (and, with ``pixels=True``, its images in pixel space) this computes, per channel,
the box-and-whisker statistics of Figure 1: quartiles, Tukey's inner (1.5 IQR) and outer (3 IQR)
fences, the fraction of values beyond each, min/max and the excess kurtosis; with a network it does
the same for the temporal difference TD = f(x_{t_{i+1}}, t_{i+1}) - f(x_{t_i}, t_i) of consistency
training (REFERENCE.md [2]). Results go to a PNG (the figure) and a JSON (the numbers).

Data are standardised per channel before plotting by default (``STANDARDIZE``), so values read in
standard deviations and pixels and latents share one scale; fence fractions do not depend on it (an
affine map per channel moves quartiles and fences together). "per-element" is the authors'
normalisation (what the model sees, up to the factor sigma_data). TDs are shown in the model's units
(per-element normalised latents, pixels in [-1, 1]), as in the paper.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FENCES = {"inner": 1.5, "outer": 3.0}  # Tukey's fences in interquartile ranges (paper Figure 1)
MAX_FLIERS_DRAWN = 400  # per box; the extremes are always drawn


def box_stats(values: np.ndarray) -> dict[str, float]:
    """Box-plot statistics of a 1-D sample (quantiles interpolate linearly, as numpy and matplotlib)."""
    v = np.asarray(values, np.float64).reshape(-1)
    q1, median, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    iqr = q3 - q1
    out: dict[str, float] = {"count": int(v.size), "q1": q1, "median": median, "q3": q3, "iqr": iqr}
    for name, k in FENCES.items():
        lo, hi = q1 - k * iqr, q3 + k * iqr
        out[f"{name}_fence_lo"], out[f"{name}_fence_hi"] = lo, hi
        out[f"beyond_{name}"] = float(np.mean((v < lo) | (v > hi)))
    # whiskers end at the most extreme values inside the inner fences (Tukey; matplotlib's default)
    out["whisker_lo"] = v[v >= out["inner_fence_lo"]].min()
    out["whisker_hi"] = v[v <= out["inner_fence_hi"]].max()
    mean, std = v.mean(), v.std()
    out.update(min=v.min(), max=v.max(), mean=mean, std=std,
               excess_kurtosis=float(np.mean(((v - mean) / std) ** 4) - 3) if std > 0 else 0.0)
    return {k: float(x) if k != "count" else x for k, x in out.items()}


def channel_box_stats(x: np.ndarray) -> dict[str, Any]:
    """x (N, C, H, W) -> {"channels": [box_stats of channel c], "all": box_stats of every value}."""
    return {"channels": [box_stats(x[:, c]) for c in range(x.shape[1])], "all": box_stats(x)}


def _standardize(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    std = x.std(axis=axes, keepdims=True)
    return (x - x.mean(axis=axes, keepdims=True)) / np.where(std > 0, std, 1)


# mode -> x (N, C, H, W) -> standardised x; statistics from the analysed sample itself
STANDARDIZE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "per-channel": lambda x: _standardize(x, (0, 2, 3)),
    "per-element": lambda x: _standardize(x, (0,)),  # the authors' normalisation, without the sigma_data factor
    "none": lambda x: x,
}


# ---------------------------------------------------------------------------------------------------------------------
# Data


def load_latents(dataset, limit: int | None) -> np.ndarray:
    """Raw latents of ``limit`` samples spread evenly over ``dataset`` (all when None), float64 (N, C, H, W)."""
    from slct.data.encode import select_indices

    return dataset.raw(select_indices(len(dataset), limit)).astype(np.float64)


def load_pixels(manifest: dict, limit: int | None, num_workers: int | None = None,
                progress: bool = False) -> np.ndarray:
    """The dataset's source images, prepared as for encoding, float64 (N, C, R, R) in [-1, 1].

    ``limit`` images spread evenly over the images that were selected for encoding (its split included).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from slct.data.encode import _as_list, _Decoded, select_indices, split_indices
    from slct.data.sources import open_source

    source = manifest["source"]
    if source["kind"] not in ("folder", "zip") or not Path(source["path"]).exists():
        raise FileNotFoundError(f"the images of this dataset ({source['kind']} {source['path']}) are not readable "
                                "here; pixel statistics need the original folder or .zip")
    src = open_source(source["path"], "none")
    sel = manifest["selection"]
    selected = split_indices(len(src), sel.get("holdout", 0), sel.get("split", "all"), sel["limit"])
    chosen = selected[select_indices(len(selected), limit)]
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    options = manifest.get("image_options", {"alpha_background": "white", "min_size": 0})
    data = _Decoded(src, chosen, manifest["image_resolution"], manifest["image_channels"], manifest["resample"],
                    options["alpha_background"], options["min_size"])
    images = []
    with tqdm(total=len(chosen), desc="pixels: read images", unit="img", disable=not progress) as bar:
        for batch in DataLoader(data, batch_size=64, num_workers=workers, collate_fn=_as_list):
            images += [im for _, im, _, skip, _ in batch if skip is None]
            bar.update(len(batch))
    return np.stack(images).astype(np.float64) / 127.5 - 1


# ---------------------------------------------------------------------------------------------------------------------
# Temporal difference (paper section 4.1, Figure 1 right)


@torch.no_grad()
def temporal_differences(model: torch.nn.Module, x0: torch.Tensor, n_scales: int, generator: torch.Generator,
                         batch_size: int = 64, progress: bool = False, desc: str = "TD") -> torch.Tensor:
    """TD = f(x0 + t_{i+1} z, t_{i+1}) - f(x0 + t_i z, t_i), one z and one i per sample (REFERENCE.md [2]).

    x0: (N, C, H, W) model data (normalised latents or pixels in [-1, 1]); i is drawn from iCT's
    discrete lognormal over the ``n_scales``-point Karras grid. Returns (N, C, H, W) float32 on the CPU.
    """
    from slct import karras_sigmas, sample_timestep_indices

    device = next(model.parameters()).device
    sigmas = karras_sigmas(n_scales).float()
    out = []
    from tqdm.auto import tqdm

    # counted in samples and advanced after each pass: a pixel-space batch takes long, a bar of batches sat at 0/1
    with tqdm(total=len(x0), desc=desc, unit="sample", disable=not progress) as bar:
        for start in range(0, len(x0), batch_size):
            x = x0[start:start + batch_size].float()
            i = sample_timestep_indices(n_scales, len(x), generator=generator)
            z = torch.randn(x.shape, generator=generator)
            t_lo, t_hi = sigmas[i].view(-1, 1, 1, 1), sigmas[i + 1].view(-1, 1, 1, 1)
            f_hi = model((x + t_hi * z).to(device), t_hi.flatten().to(device))
            bar.update(len(x) // 2)
            f_lo = model((x + t_lo * z).to(device), t_lo.flatten().to(device))
            bar.update(len(x) - len(x) // 2)
            out.append((f_hi - f_lo).float().cpu())
    return torch.cat(out)


def build_td_model(network: str | None, checkpoint: str | os.PathLike | None, latent_shape: tuple[int, int, int],
                   sigma_data: float = 0.5):
    """The consistency model f for the TD analysis and the normaliser it expects (None: the dataset's).

    ``checkpoint`` may be an ``slct train`` snapshot or training checkpoint (network and normalisation come
    from it), or a plain state dict of a ``PrecondModel`` or of its backbone (then ``network`` names the
    preset). Without a checkpoint, ``network`` is built freshly initialised: its zero-initialised output
    layer makes f(x, t) = c_skip(t) x, so the TD then reflects the data and the noise alone.
    """
    from slct.nn import build_network
    from slct.precond import Precond, PrecondModel

    from slct.checkpoint import load_untrusted

    payload = load_untrusted(checkpoint, "slct snapshot, checkpoint or state dict") if checkpoint else None
    if isinstance(payload, dict) and str(payload.get("format", "")).startswith("slct-snapshot"):
        from slct.sampling import load_snapshot
        snap = load_snapshot(checkpoint)
        _refuse_flow(snap.config.objective.kind, checkpoint)
        return snap.model.eval(), snap.normalizer
    if isinstance(payload, dict) and str(payload.get("format", "")).startswith("slct-checkpoint"):
        from slct.config import config_from_dict
        from slct.data import Normalizer
        cfg = config_from_dict(payload["config"])
        obj = cfg.objective
        _refuse_flow(obj.kind, checkpoint)
        model = PrecondModel(build_network(cfg.network.name, **payload["network_kwargs"]),
                             Precond(sigma_data=obj.sigma_data, sigma_min=obj.sigma_min, kind=obj.kind))
        model.load_state_dict(payload["model"])
        return model.eval(), Normalizer.from_dict(payload["normalizer"])
    if network is None:
        raise ValueError("the TD analysis needs --network PRESET (and optionally --checkpoint with its state dict)")
    model = PrecondModel(_fresh_network(network, *latent_shape[:2]), Precond(sigma_data))
    if payload is not None:
        if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise ValueError(f"{checkpoint} is neither an slct snapshot/checkpoint nor a state dict")
        target = model if any(k.startswith("net.") for k in payload) else model.net
        target.load_state_dict(payload)
    return model.eval(), None


def _fresh_network(preset: str, channels: int, resolution: int) -> torch.nn.Module:
    """The preset for data of another shape; attention stays at the same levels of the UNet (resolutions scaled)."""
    from slct.nn import build_network, follow_resolution

    return build_network(preset, **follow_resolution(preset, resolution,
                                                     {"in_channels": channels, "resolution": resolution}))


# ---------------------------------------------------------------------------------------------------------------------
# Figure, table, entry point


def _draw_boxes(ax, x: np.ndarray, stats: dict, title: str, ylabel: str, rng: np.random.Generator) -> None:
    boxes = []
    for c, s in enumerate(stats["channels"]):
        v = x[:, c].reshape(-1)
        fliers = v[(v < s["inner_fence_lo"]) | (v > s["inner_fence_hi"])]
        if len(fliers) > MAX_FLIERS_DRAWN:  # thin the dots, keep the extremes
            keep = rng.choice(len(fliers), MAX_FLIERS_DRAWN - 2, replace=False)
            fliers = np.concatenate([fliers[keep], [fliers.min(), fliers.max()]])
        boxes.append({"med": s["median"], "q1": s["q1"], "q3": s["q3"], "whislo": s["whisker_lo"],
                      "whishi": s["whisker_hi"], "fliers": fliers, "label": str(c)})
    ax.bxp(boxes, patch_artist=True, boxprops={"facecolor": "tab:blue", "edgecolor": "navy", "alpha": 0.8},
           medianprops={"color": "white"}, flierprops={"marker": ".", "markersize": 3, "markerfacecolor": "red",
                                                        "markeredgecolor": "none", "alpha": 0.6})
    pos = np.arange(1, len(boxes) + 1)
    for name, color in (("inner", "tab:green"), ("outer", "tab:orange")):
        for side in ("lo", "hi"):
            ax.hlines([s[f"{name}_fence_{side}"] for s in stats["channels"]], pos - 0.4, pos + 0.4, colors=color,
                      linestyles="dashed", linewidth=1, label=f"{name} fence" if side == "lo" else None)
    a = stats["all"]
    ax.set_title(f"{title}\nrange [{a['min']:.2f}, {a['max']:.2f}], beyond inner {100 * a['beyond_inner']:.2f}%, "
                 f"outer {100 * a['beyond_outer']:.3f}%", fontsize=9)
    ax.set_xlabel("channel")
    ax.set_ylabel(ylabel)
    if len(boxes) > 16:
        ax.set_xticks(pos[::4], [str(c) for c in range(0, len(boxes), 4)])
    ax.legend(loc="upper right", fontsize=7)


def plot_analysis(panels: dict[tuple[str, str], tuple[np.ndarray, dict, str, str]], path: Path) -> Path:
    """panels: (row name, column name) -> (values (N, C, H, W), channel_box_stats, title, y label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys(r for r, _ in panels))
    cols = list(dict.fromkeys(c for _, c in panels))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(7 * len(cols), 3.6 * len(rows)), squeeze=False)
    rng = np.random.default_rng(0)
    for (r, c), (x, stats, title, ylabel) in panels.items():
        _draw_boxes(axes[rows.index(r), cols.index(c)], x, stats, title, ylabel, rng)
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            if (row, col) not in panels:
                axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(report: dict) -> str:
    """One row per analysed space: quartiles, extremes, fence fractions and kurtosis of all values pooled."""
    width = max([18, *(len(name) for name in report["panels"])])
    head = (f"{'':{width}s} {'values':>9s} {'min':>8s} {'q1':>7s} {'median':>7s} {'q3':>7s} {'max':>8s} "
            f"{'>inner':>8s} {'>outer':>8s} {'ex.kurt':>8s}")
    lines = [head, "-" * len(head)]
    for name, stats in report["panels"].items():
        a = stats["all"]
        lines.append(f"{name:{width}s} {a['count']:9d} {a['min']:8.3f} {a['q1']:7.3f} {a['median']:7.3f} {a['q3']:7.3f} "
                     f"{a['max']:8.3f} {100 * a['beyond_inner']:7.3f}% {100 * a['beyond_outer']:7.3f}% "
                     f"{a['excess_kurtosis']:8.2f}")
    return "\n".join(lines)


def _td_panels(spaces: dict[str, np.ndarray], manifest: dict, latent_shape: tuple[int, int, int],
               network: str | None, checkpoint, n_scales: int, td_samples: int, seed: int, device: str,
               progress: bool = False):
    """TD panels for the latents (model from ``build_td_model``) and, when loaded, the pixels (fresh ``network``)."""
    from slct.data import Normalizer
    from slct.data.encode import select_indices

    generator = torch.Generator().manual_seed(seed)
    model, normalizer = build_td_model(network, checkpoint, latent_shape)
    normalizer = normalizer or Normalizer.from_manifest(manifest, "per-element", 0.5)  # authors' (REFERENCE [7])
    panels = {}
    for name, x in spaces.items():
        x0 = torch.from_numpy(x[select_indices(len(x), td_samples)]).float()
        if name == "latents":
            f, x0 = model, normalizer.normalize(x0)
        else:  # pixels in [-1, 1], as the model would see them
            f, _ = build_td_model(network or "unet-tiny", None, tuple(x.shape[1:]))
        td = temporal_differences(f.to(device), x0, n_scales, generator, progress=progress,
                                  desc=f"{name}: temporal differences").numpy()
        panels[(name, "td")] = (td, channel_box_stats(td), f"{name[:-1]} TD, N = {n_scales}", "TD")
    info = {"network": network, "checkpoint": str(checkpoint) if checkpoint else None, "n_scales": n_scales,
            "samples": len(x0), "latent_normalization": normalizer.mode}
    return panels, info


def analyze(data_dir: str | os.PathLike, out_dir: str | os.PathLike, pixels: bool = False, limit: int | None = 4096,
            normalization: str = "per-channel", network: str | None = None, n_scales: int = 21,
            checkpoint: str | os.PathLike | None = None, td_samples: int = 256, seed: int = 0,
            device: str = "cpu", num_workers: int | None = None, progress: bool = False,
            return_panels: bool = False) -> dict:
    """Analyse a latent dataset; writes ``analysis.png`` and ``analysis.json`` to ``out_dir`` and returns the report
    (and, with ``return_panels``, the plotted panels too).

    Args:
        limit: samples used for the data statistics, spread evenly over the dataset (None: all).
        normalization: how data are standardised for the plot (``STANDARDIZE``).
        network, checkpoint, n_scales, td_samples: the TD analysis, run when ``network`` or ``checkpoint``
            is given (see ``build_td_model``); TDs of ``td_samples`` samples on the ``n_scales`` grid.
    """
    from slct.data import LatentDataset

    if normalization not in STANDARDIZE:
        raise ValueError(f"normalization must be one of {list(STANDARDIZE)}, got {normalization!r}")
    out_dir = Path(out_dir)
    dataset = LatentDataset(data_dir, normalization="none")
    manifest = dataset.manifest
    describe = f"{manifest['codec_id']}, {manifest['image_resolution']} px"
    unit = "std. deviations" if normalization != "none" else "value"
    latents = load_latents(dataset, limit)
    spaces = {"latents": latents}
    if pixels:
        spaces = {"pixels": load_pixels(manifest, limit, num_workers, progress), **spaces}
    panels: dict[tuple[str, str], tuple] = {}
    for name, x in spaces.items():
        if progress:
            print(f"{name}: box statistics of {x.size:,} values", file=sys.stderr, flush=True)
        x = STANDARDIZE[normalization](x)
        title = f"{name} ({describe if name == 'latents' else str(manifest['image_resolution']) + ' px'})"
        panels[(name, "data")] = (x, channel_box_stats(x), title, unit)

    td_info = None
    if network is not None or checkpoint is not None:
        td_panels, td_info = _td_panels(spaces, manifest, dataset.latent_shape, network, checkpoint, n_scales,
                                        td_samples, seed, device, progress)
        panels.update(td_panels)

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "dataset": str(Path(data_dir)), "codec_id": manifest["codec_id"], "codec": manifest.get("codec"),
        "image_resolution": manifest["image_resolution"], "latent_shape": manifest["latent_shape"],
        "samples": {name: int(len(x)) for name, x in spaces.items()}, "normalization": normalization,
        "fences_iqr": FENCES, "td": td_info,
        "panels": {f"{r} {c}": stats for (r, c), (_, stats, _, _) in panels.items()},
        "advice": recipe_advice(latent_kurtosis(latents)),
    }
    (out_dir / "analysis.json").write_text(json.dumps(report, indent=1))
    plot_analysis(panels, out_dir / "analysis.png")
    if return_panels:
        return report, panels
    return report


def compare(data_dirs: list, out_dir: str | os.PathLike, **kwargs) -> dict:
    """``slct analyze DIR DIR ...``: each dataset analysed into ``out_dir/NAME/`` as :func:`analyze` does, and
    side by side in ``out_dir/comparison.png`` (one row per dataset and space, the TD column when a network is
    given) and ``comparison.json`` (each dataset's pooled statistics): plain and outlier latents of the same images,
    say (the paper's Fig. 1 against a controlled testbed)."""
    out_dir = Path(out_dir)
    names = [Path(d).name or str(d) for d in data_dirs]
    names = [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]  # distinct folder names
    reports, combined = {}, {}
    for name, data_dir in zip(names, data_dirs):
        report, panels = analyze(data_dir, out_dir / name, return_panels=True, **kwargs)
        reports[name] = report
        for (row, col), (x, stats, title, unit) in panels.items():
            combined[(f"{name} {row}", col)] = (x, stats, f"{name}: {title}", unit)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"datasets": {name: {"dataset": r["dataset"], "codec_id": r["codec_id"], "codec": r.get("codec"),
                                   "panels": {k: v["all"] for k, v in r["panels"].items()}, "advice": r["advice"]}
                            for name, r in reports.items()}}
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=1))
    plot_analysis(combined, out_dir / "comparison.png")
    return {"panels": {f"{name} {k}": v for name, r in reports.items() for k, v in r["panels"].items()},
            "reports": reports}


def _refuse_flow(kind: str, path) -> None:
    """The TD analysis measures a consistency function f(x, sigma) (paper section 4.1); flow models have none."""
    from slct.objectives import is_flow

    if is_flow(kind):
        raise ValueError(f"{path} is a {kind} model: the TD analysis measures consistency pairs f(x, sigma) (paper "
                         "section 4.1), which an average-velocity model does not define; analyze its latents without "
                         "--checkpoint, or a consistency run's checkpoint")


# ---------------------------------------------------------------------------------------------------------------------
# Which recipe the latents point to (the paper's premise, tested: benchmarks/premise.py)


@dataclass(frozen=True)
class PremiseFinding:
    """One recipe against iLCT on one set of latents of the premise study (UTKFace 64 px, TAEF2 through the outlier
    codec, unet-small, 2,000 steps, 3 seeds a side, 1-step FD). ``method`` is a preset: ``slct`` or a rung of the
    paper's Table 2a ladder (``ladder-cauchy`` ... ``ladder-adaptive-c``)."""

    strength: str  # the outlier codec's strength ("1": the plain codec)
    kurtosis: float  # the latents' excess kurtosis, per-element standardised (as `latent_kurtosis` measures it)
    method: str  # the preset compared with ilct
    minus_ilct: float  # its mean 1-step FD minus iLCT's (negative: it is better)
    two_pooled_sd: float  # the judging rule's margin: a difference beyond it decides

    @property
    def verdict(self) -> str:
        """``method`` / "ilct": that recipe's FD is lower by more than 2 pooled sd; "tie": neither."""
        if self.minus_ilct < -self.two_pooled_sd:
            return self.method
        return "ilct" if self.minus_ilct > self.two_pooled_sd else "tie"


# benchmarks/results/premise-utkface64-2000steps.json (`python benchmarks/premise.py`); tests/test_analyze.py holds
# these equal to that report
PREMISE_FINDINGS: tuple[PremiseFinding, ...] = (
    PremiseFinding("1", 0.18, "slct", 29.84, 7.95),  # TAEF2 as it is: iLCT better than sLCT
    PremiseFinding("1", 0.18, "ladder-adaptive-c", 9.09, 3.90),  # ... and than sLCT without NsLN
    PremiseFinding("1", 0.18, "ladder-ot", 10.08, 2.75),  # ... and than Cauchy + diffusion + OT
    PremiseFinding("1", 0.18, "ladder-diff", 2.01, 4.08),  # a tie
    PremiseFinding("1", 0.18, "ladder-cauchy", 2.34, 3.57),  # a tie
    PremiseFinding("spike:10", 141.97, "slct", 22.55, 57.57),  # a tie: sLCT's seeds spread 250-325
    PremiseFinding("spike:10", 141.97, "ladder-adaptive-c", 41.98, 38.52),  # iLCT better: seeds 319, 269, 308
    PremiseFinding("spike:10", 141.97, "ladder-ot", 21.16, 60.45),  # a tie: seeds 229, 302, 303
    PremiseFinding("spike:10", 141.97, "ladder-diff", 18.19, 55.72),  # a tie: seeds 277, 235, 312
    PremiseFinding("spike:10", 141.97, "ladder-cauchy", -8.92, 26.74),  # a tie
    PremiseFinding("spike:30", 321.67, "slct", -28.39, 145.62),  # a tie: sLCT's seeds spread 391-583
    PremiseFinding("spike:30", 321.67, "ladder-adaptive-c", 43.08, 128.18),  # a tie: seeds 584, 434, 595
    PremiseFinding("spike:30", 321.67, "ladder-ot", 56.06, 79.04),  # a tie: seeds 602, 492, 557
    PremiseFinding("spike:30", 321.67, "ladder-diff", 25.29, 91.86),  # a tie: seeds 573, 539, 448
    PremiseFinding("spike:30", 321.67, "ladder-cauchy", -27.06, 46.11),  # a tie: seeds 473, 434, 496
)
PREMISE_EVIDENCE = "docs/results.md, 'The paper's premise, tested' (benchmarks/results/premise-utkface64-2000steps.md)"


def latent_kurtosis(latents: np.ndarray) -> float:
    """Excess kurtosis of latents (N, C, H, W) standardised per element (the authors' normalisation), all values
    pooled: the statistic the premise study's strengths are placed by."""
    return box_stats(STANDARDIZE["per-element"](latents))["excess_kurtosis"]


def recipe_advice(kurtosis: float, findings: tuple[PremiseFinding, ...] = PREMISE_FINDINGS) -> dict[str, Any]:
    """Which preset latents of this excess kurtosis point to, from the measured findings: at the nearest measured
    kurtosis at or below it (the lowest one when it lies below all, so advice never rests on a gain measured only at
    higher kurtosis), the recipe that beat iLCT by the most (beyond 2 pooled sd), else ilct. ``threshold``: the
    lowest kurtosis at which any recipe beat iLCT (None: nowhere), ``threshold_preset`` that recipe."""
    levels = sorted({f.kurtosis for f in findings})
    if not levels:
        return dict(preset=None, kurtosis=kurtosis, threshold=None, threshold_preset=None,
                    text="no premise study measured yet: compare `--preset ilct` and `--preset slct` on your data")
    at = {level: sorted((f for f in findings if f.kurtosis == level), key=lambda f: f.minus_ilct) for level in levels}
    wins = {level: [f for f in at[level] if f.verdict == f.method] for level in levels}
    first = next((level for level in levels if wins[level]), None)
    near = max([level for level in levels if level <= kurtosis], default=levels[0])
    best = wins[near][0] if wins[near] else None
    preset = best.method if best else "ilct"  # no recipe better: the simpler one (a tie: the steadier seeds, too)
    if best:
        why = f"{best.method} beat iLCT by {-best.minus_ilct:.1f}, 2 pooled sd {best.two_pooled_sd:.1f}"
    else:
        losers = [f.method for f in at[near] if f.verdict == "ilct"]
        why = "no recipe beat iLCT" + (f"; it beat {', '.join(losers)}" if losers else ", and it is the simplest")
    measured = "; ".join(f"{level:.2f}: " + ", ".join(f"{f.method} {f.minus_ilct:+.1f} ({f.two_pooled_sd:.1f})"
                                                        for f in at[level]) for level in levels)
    first_preset = wins[first][0].method if first is not None else None
    where = (f"a recipe beat iLCT from kurtosis {first:.1f} on ({first_preset})" if first is not None
             else f"no recipe beat iLCT at any kurtosis measured (up to {levels[-1]:.1f})")
    text = (f"latents' excess kurtosis {kurtosis:.2f} (per-element): train `--preset {preset}` (nearest measured "
            f"kurtosis {near:.2f}: {why}). Measured at UTKFace 64 px, 2,000 steps, 3 seeds (per kurtosis, each "
            f"recipe's 1-step FD minus iLCT's, 2 pooled sd in brackets): {measured}; {where}")
    if kurtosis > levels[-1]:
        text += "; yours lies beyond the measured range: worth training both"
    return dict(preset=preset, kurtosis=kurtosis, threshold=first, threshold_preset=first_preset,
                text=f"{text}. Evidence: {PREMISE_EVIDENCE}")
