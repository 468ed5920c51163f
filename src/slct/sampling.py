"""Samplers and snapshots.

- Consistency sampling (REFERENCE [9]): 1 step x = f(sigma_max z, sigma_max); each further step re-noises to the next
  sigma (x + sqrt(sigma^2 - sigma_min^2) z') and applies f again.
- EDM's deterministic Heun / Euler solver for the ``ldm`` diffusion baseline.
- Flow few-step sampling (MeanFlow, Shortcut): k equal steps from t = 1 to 0, ``x <- x - (1/k) u(x, t, 1/k)``.
- Per-sample seeds: sample i's noise comes from its own generator seeded with ``seeds[i]``, so a sample is the same
  whatever the batch size or the number of processes.
- Class labels of a conditional model are a pure function of each sample's seed too (:func:`labels_for_seeds`).
- Classifier-free guidance (:class:`Guided`) for the ``ldm`` diffusion baseline only: see :func:`check_guidance`.
- A snapshot file holds the EMA weights, the resolved config and the codec/normalisation metadata: everything needed to
  generate and decode, without the dataset or the training state.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from slct import __version__, checkpoint
from slct.checkpoint import SNAPSHOT_FORMAT
from slct.config import FLOW_SOLVERS
from slct.data.labels import resolve_class
from slct.nn.layers import label_features
from slct.objectives import OBJECTIVES, parameterisation
from slct.sigmas import karras_sigmas


def noise_for_seeds(seeds, shape: tuple[int, ...], count: int = 1, device=None) -> list[torch.Tensor]:
    """``count`` unit-Gaussian tensors of shape (len(seeds), *shape); row i depends on seeds[i] alone."""
    out = [torch.empty((len(seeds), *shape)) for _ in range(count)]
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        for k in range(count):
            out[k][i] = torch.randn(shape, generator=g)
    return [t.to(device) for t in out]


def consistency_sigmas(nfe: int, sigma_max: float = 80.0, sigma_mid: float = 0.36931547703985584,
                       sigma_min: float = 0.002, grid_points: int = 641, rho: float = 7.0) -> list[float]:
    """Noise levels for k-step consistency sampling: [sigma_max] for 1 step, [sigma_max, sigma_mid] for 2 (REFERENCE
    [9]); for k > 2, k levels spaced evenly in grid index between sigma_max and sigma_mid on the 641-point grid."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if nfe == 1:
        return [float(sigma_max)]
    if nfe == 2:
        return [float(sigma_max), float(sigma_mid)]
    grid = karras_sigmas(grid_points, sigma_min, sigma_max, rho).double().flip(0)  # descending
    mid_index = int(torch.argmin((grid - sigma_mid).abs()))
    picks = torch.linspace(0, mid_index, nfe).round().long()
    return [float(grid[i]) for i in picks]


@torch.no_grad()
def consistency_sample(model, noises: list[torch.Tensor], sigmas: list[float], sigma_min: float = 0.002,
                       class_labels=None) -> torch.Tensor:
    """Multistep consistency sampling; ``noises`` holds one tensor per step (the first is the initial noise)."""
    if len(noises) < len(sigmas):
        raise ValueError(f"need one noise tensor per step: {len(noises)} for {len(sigmas)} steps")
    x = noises[0] * sigmas[0]
    x = model(x, torch.full((x.shape[0],), sigmas[0], device=x.device), class_labels)
    for sigma, z in zip(sigmas[1:], noises[1:]):
        x = x + math.sqrt(max(sigma**2 - sigma_min**2, 0.0)) * z
        x = model(x, torch.full((x.shape[0],), sigma, device=x.device), class_labels)
    return x


@torch.no_grad()
def edm_sample(model, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, solver: str = "heun", class_labels=None) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1) on the VE process; ``model`` is the denoiser D(x, s).

    Heun uses 2 * num_steps - 1 network evaluations, Euler num_steps.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    t = karras_sigmas(num_steps, sigma_min, sigma_max, rho).double().flip(0).tolist() + [0.0]
    x = noise.double() * t[0]
    b = x.shape[0]

    def denoise(x, s):
        return model(x.float(), torch.full((b,), s, device=x.device), class_labels).double()

    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = (x - denoise(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if solver == "heun" and t_next > 0:
            d_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d + d_next)
        x = x_next
    return x.float()


# ---------------------------------------------------------------------------------------------------------------------
# Class labels and guidance

LABEL_MODES = ("balanced", "random", "none")


def labels_for_seeds(spec, seeds, num_classes: int, class_names=()) -> torch.Tensor | None:
    """Class ids (B,) int64 for ``seeds``, each a function of its seed alone (any batch, any process count).

    ``spec``: None or "balanced": class ``seed mod K`` (consecutive seeds cycle through the classes, so n samples
    hold every class n/K times, within one); "random": uniform, drawn from the seed; "none": no label (the null
    label: the unconditional output of a network trained with label dropout); a list of class names or ids (a
    string is looked up as a name first, then as an id): the sample with seed s gets ``labels[s mod len(labels)]``
    (one entry: every sample). An unconditional model
    (``num_classes == 0``) takes None or "none" only.
    """
    items = [spec] if spec is None or isinstance(spec, (str, int)) else list(spec)
    if num_classes == 0:
        if items not in ([None], ["none"]):
            raise ValueError("this model is unconditional (trained without data.conditional): it takes no --labels")
        return None
    seeds = [int(s) for s in seeds]
    if items in ([None], ["balanced"]):
        return torch.tensor([s % num_classes for s in seeds], dtype=torch.int64)
    if items == ["random"]:
        return torch.tensor([int(torch.randint(num_classes, (), generator=torch.Generator().manual_seed(s + 2**40)))
                             for s in seeds], dtype=torch.int64)  # an offset stream: not the noise's generator
    if items == ["none"]:
        return None
    for item in items:
        if str(item) in LABEL_MODES:
            raise ValueError(f"--labels {item} cannot be combined with other labels")
    ids = [resolve_class(item, class_names, num_classes, owner="this model") for item in items]
    return torch.tensor([ids[s % len(ids)] for s in seeds], dtype=torch.int64)


def describe_labels(spec) -> str | list | None:
    """The label choice as recorded in results (the resolved default included)."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, (str, int)) else list(spec)
    return items[0] if len(items) == 1 and str(items[0]) in LABEL_MODES else [str(i) for i in items]


class Guided(torch.nn.Module):
    """Classifier-free guidance of a denoiser: ``D = D(x | none) + w (D(x | c) - D(x | none))`` (Ho & Salimans
    2022, in EDM's denoiser form); w = 1 is the conditional denoiser. One batched call evaluates both halves."""

    def __init__(self, model, guidance: float):
        super().__init__()
        self.model, self.guidance = model, float(guidance)

    def forward(self, x, sigma, class_labels=None):
        if class_labels is None or self.guidance == 1:
            return self.model(x, sigma, class_labels)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(b)
        dim = self.model.net.label_dim
        labels = label_features(class_labels.to(x.device), dim, b)
        null = label_features(None, dim, b, device=x.device)  # the all-zero label that label dropout trained
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond, uncond = both[:b], both[b:]
        return uncond + self.guidance * (cond - uncond)


def check_guidance(guidance: float, objective_kind: str, num_classes: int, label_dropout: float) -> None:
    """Refuse guidance where it has no meaning.

    Guidance extrapolates between two *denoisers* along the probability-flow ODE; a solver then integrates the
    guided field. A consistency model is the ODE's solution map: mixing two of its outputs is not guidance of
    anything (the mix of two endpoints is not the endpoint of the mixed flow), and a model trained without
    label dropout has never seen the null label. Guided few-step generation has to be trained in (e.g. guided
    consistency distillation); slct's consistency objectives do not, so ``guidance != 1`` is refused for them.
    """
    if guidance == 1:
        return
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"--guidance must be a finite number >= 0, got {guidance}")
    if objective_kind != "edm":
        raise ValueError("--guidance is classifier-free guidance of a diffusion denoiser (the ldm baseline); a "
                         "consistency model maps noise to data directly and mixing two of its outputs is not "
                         "guidance (docs/evaluation.md)")
    if num_classes == 0:
        raise ValueError("--guidance needs a class-conditional model (data.conditional: true)")
    if not label_dropout > 0:
        raise ValueError("--guidance needs a network trained with label dropout (network.label_dropout > 0, "
                         "e.g. 0.1): this one never saw the null label, so its unconditional output is undefined")


@torch.no_grad()
def flow_sample(model, noise: torch.Tensor, nfe: int, class_labels=None) -> torch.Tensor:
    """k = ``nfe`` equal steps of an average-velocity model u(x, t, h) (slct.precond.FlowModel) from noise (t = 1)
    to data (t = 0): ``x_{t - 1/k} = x_t - (1/k) u(x_t, t, 1/k)``. One step is MeanFlow's ``x = e - u(e, 1, 1)``
    (their eq. 12); for a shortcut model each step is a jump of size d = 1/k."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    x, h = noise, 1.0 / nfe
    for k in range(nfe):
        t = 1.0 - k * h
        full = dict(size=(x.shape[0],), device=x.device, dtype=x.dtype)
        x = x - h * model(x, torch.full(fill_value=t, **full), class_labels, torch.full(fill_value=h, **full))
    return x


@torch.no_grad()
def flow_ode_sample(model, noise: torch.Tensor, nfe: int, solver: str = "heun", class_labels=None) -> torch.Tensor:
    """Integrate the instantaneous velocity, dx/dt = u(x, t, 0), from noise (t = 1) to data (t = 0) on a uniform
    grid with exactly ``nfe`` network evaluations: Euler takes ``nfe`` steps; Heun (Karras et al. 2022, Alg. 1 on
    the flow path) takes ceil(nfe / 2) steps, each with its second-order correction except the last one when
    ``nfe`` is odd (2 x steps - 1 evaluations, as EDM's). Any flow objective's network can be sampled so (its h = 0
    output is the flow-matching velocity), not only ``fm``'s."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    steps = nfe if solver == "euler" else (nfe + 1) // 2
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x, b = noise.double(), noise.shape[0]
    zero = torch.zeros(b, device=noise.device, dtype=noise.dtype)

    def velocity(x, t):
        return model(x.to(noise.dtype), torch.full((b,), t, device=x.device, dtype=noise.dtype), class_labels,
                     zero).double()

    for k, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        d = velocity(x, t_cur)
        x_next = x + (t_next - t_cur) * d
        last_euler = solver == "heun" and k == steps - 1 and nfe % 2 == 1
        if solver == "heun" and not last_euler:
            x_next = x + (t_next - t_cur) * 0.5 * (d + velocity(x_next, t_next))
        x = x_next
    return x.to(noise.dtype)


def set_solver(sampling_cfg, objective_kind: str, solver: str) -> None:
    """``slct sample/eval --solver``: euler | heun for the ldm baseline's EDM sampler (``ldm_solver``) and for a flow
    objective's velocity ODE, map for a flow-map objective's own k-step sampler (``flow_solver``); a consistency
    model has one sampler. Sets the field on ``sampling_cfg`` (a snapshot's private copy)."""
    wrapper = parameterisation(objective_kind)
    if wrapper == "edm" and solver in ("euler", "heun"):
        sampling_cfg.ldm_solver = solver
    elif wrapper == "flow" and solver in FLOW_SOLVERS:
        sampling_cfg.flow_solver = solver
    else:
        allowed = {"edm": "euler, heun", "flow": ", ".join(FLOW_SOLVERS)}.get(wrapper, "none (leave --solver out)")
        raise ValueError(f"--solver {solver}: a {objective_kind} model's solvers are {allowed}")
    if wrapper == "flow" and solver == "map" and not OBJECTIVES[objective_kind].flow_map:
        raise ValueError(f"--solver map: a {objective_kind} model learns an instantaneous velocity, not a flow map; "
                         "use --solver euler or heun")


def sample_latents(model, seeds, latent_shape: tuple[int, ...], nfe: int, objective_cfg, sampling_cfg,
                   class_labels=None, device=None, guidance: float = 1.0) -> torch.Tensor:
    """Normalised latents for ``seeds`` with ``nfe`` steps of the sampler that fits the objective's kind.

    ``guidance`` (ldm only; see :func:`check_guidance`): classifier-free guidance weight, 1 = none.
    """
    device = device or next(model.parameters()).device
    if class_labels is not None:
        class_labels = class_labels.to(device)
    if guidance != 1:
        model = Guided(model, guidance)
    wrapper = parameterisation(objective_cfg.kind)  # the sampler follows the parameterisation
    if wrapper == "flow":
        (z,) = noise_for_seeds(seeds, latent_shape, 1, device)
        if sampling_cfg.flow_solver == "map":
            return flow_sample(model, z, nfe, class_labels)
        return flow_ode_sample(model, z, nfe, sampling_cfg.flow_solver, class_labels)
    if wrapper == "edm":
        if sampling_cfg.ldm_solver == "heun" and nfe < 3 or nfe < 2:
            raise ValueError(f"{nfe} NFE: the ldm baseline's {sampling_cfg.ldm_solver} sampler needs at least "
                             f"{3 if sampling_cfg.ldm_solver == 'heun' else 2} (Heun uses 2 x steps - 1 network "
                             "evaluations, steps >= 2; Euler uses one per step)")
        (z,) = noise_for_seeds(seeds, latent_shape, 1, device)
        steps = nfe if sampling_cfg.ldm_solver == "euler" else (nfe + 1) // 2
        return edm_sample(model, z, steps, objective_cfg.sigma_min, objective_cfg.sigma_max, objective_cfg.rho,
                          sampling_cfg.ldm_solver, class_labels)
    sigmas = consistency_sigmas(nfe, objective_cfg.sigma_max, sampling_cfg.sigma_mid, objective_cfg.sigma_min,
                                rho=objective_cfg.rho)
    noises = noise_for_seeds(seeds, latent_shape, len(sigmas), device)
    return consistency_sample(model, noises, sigmas, objective_cfg.sigma_min, class_labels)


def default_nfe(objective_cfg, sampling_cfg) -> list[int]:
    """The step counts worth reporting (each objective says: 1 and 2 for consistency models and MeanFlow, 1, 2 and 4
    for shortcut models, the solver's NFE for ldm)."""
    from slct.objectives import OBJECTIVES, parameterisation

    return OBJECTIVES[objective_cfg.kind].report_nfe(sampling_cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Snapshots


def snapshot_payload(cfg, weights_by_name: dict, network_kwargs: dict, codec_spec: dict, normalizer: dict,
                     latent_shape, num_classes: int, step: int, nimg: int, data_source: dict | None = None,
                     ema_default: str | None = None) -> dict:
    """Tensors and plain values only: snapshots load with ``weights_only=True`` (see ``slct.checkpoint``).

    ``weights_by_name``: state dicts by EMA name ("rampup", "0.9999", "std=0.05", ...; "online" for the online
    weights); ``ema_default`` the one sampling uses unless told. ``data_source``: which images the run trained on
    (the dataset manifest's source and selection), so an evaluation can refuse a "held-out" reference that
    overlaps them.
    """
    return {
        "format": SNAPSHOT_FORMAT, "slct_version": __version__, "config": cfg.to_dict(),
        "network_kwargs": network_kwargs, "ema": {str(k): v for k, v in weights_by_name.items()},
        "ema_default": ema_default, "codec": codec_spec, "normalizer": normalizer, "latent_shape": list(latent_shape),
        "num_classes": num_classes, "step": step, "nimg": nimg, "data_source": data_source,
    }


def resolve_ema_name(requested: str | float | None, available: list[str], default: str | None = None) -> str:
    """The stored weights ``requested`` names: an EMA name ("rampup", "std=0.05"), a decay (0.9999 or "0.9999"),
    "online", or None for the default."""
    from slct.ema import default_ema

    if requested is None:
        return default_ema([n for n in available if n != "online"], default)
    text = str(requested)
    candidates = [text]
    try:
        number = float(text.removeprefix("std="))
        candidates += [str(number), f"std={number:g}"]
    except ValueError:
        pass
    for name in candidates:
        if name in available:
            return name
    raise ValueError(f"--ema {requested}: not stored here; available: {', '.join(available)}")


def find_snapshot(path: str | Path) -> Path:
    """A snapshot file, or the newest ``snapshot-*.pt`` in a run directory."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("snapshot-*.pt"))
        if not found:
            raise FileNotFoundError(f"no snapshot-*.pt in {path} (snapshots are written by `slct train`)")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot at {path}")
    return path


@dataclass
class Snapshot:
    path: Path
    model: torch.nn.Module
    config: object
    codec_spec: dict
    normalizer: object
    latent_shape: tuple
    num_classes: int
    step: int
    ema: str  # which stored weights: an EMA name or "online"
    device: torch.device
    _codec: object = None
    data_source: dict | None = None  # the training images (dataset manifest's source and selection), if recorded
    network_kwargs: dict | None = None  # build_network's overrides of the stored network
    nimg: int | None = None  # images seen at the stored step, where recorded

    @property
    def codec(self):
        if self._codec is None:
            from slct.codecs import get_codec

            self._codec = get_codec(**self.codec_spec).to(self.device)
        return self._codec

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the decoded images."""
        return tuple(side * self.codec.downsample for side in self.latent_shape[-2:])

    @property
    def class_names(self) -> list[str]:
        names = (self.data_source or {}).get("class_names") or []
        return [str(c) for c in names] if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def labels(self, seeds, spec=None) -> torch.Tensor | None:
        """:func:`labels_for_seeds` for this model (None spec: class-balanced for a conditional model)."""
        return labels_for_seeds(spec, seeds, self.num_classes, self.class_names)

    def check_guidance(self, guidance: float) -> None:
        check_guidance(guidance, self.config.objective.kind, self.num_classes,
                       float(getattr(self.model.net, "label_dropout", 0.0) or 0.0))

    def sample_latents(self, seeds, nfe: int, class_labels=None, guidance: float = 1.0) -> torch.Tensor:
        """Normalised latents for ``seeds``; a sample that is not finite is an error, never a black image."""
        if guidance != 1:
            self.check_guidance(guidance)
        z = sample_latents(self.model, list(seeds), self.latent_shape, nfe, self.config.objective,
                           self.config.sampling, class_labels, self.device, guidance)
        bad = (~torch.isfinite(z.flatten(1))).any(1)
        if bool(bad.any()):
            first = list(seeds)[int(bad.nonzero()[0])]
            raise ValueError(f"{self.path}: {int(bad.sum())} of {len(z)} samples at {nfe} NFE are not finite (first: "
                             f"seed {first}); nothing was written. The weights ({self.ema}) or the sampler settings "
                             "are broken: try another --ema or snapshot, or the run's own sampling settings")
        return z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] through the run's normalisation and codec."""
        return self.codec.decode(self.normalizer.denormalize(latents))

    def generate(self, seeds, nfe: int, class_labels=None, guidance: float = 1.0) -> torch.Tensor:
        return self.decode(self.sample_latents(seeds, nfe, class_labels, guidance))

    def info(self) -> dict:
        return {"path": str(self.path), "sha256": file_sha256(self.path), "step": self.step,
                "ema": self.ema, "codec": self.codec_spec, "latent_shape": list(self.latent_shape),
                "config": self.config.to_dict()}


def load_snapshot(path: str | Path, device="cpu", ema: str | float | None = None) -> Snapshot:
    """Load a snapshot, a run directory's newest, or a training checkpoint (its EMAs and online weights).

    ``ema`` picks the weights: an EMA name ("rampup", "std=0.05"), a decay (0.9999), "online", or None for the
    run's default (``train.ema_default``).
    """
    from slct.config import config_from_dict
    from slct.data import Normalizer
    from slct.nn import build_network
    from slct.precond import wrap_network

    run_dir = Path(path) if Path(path).is_dir() else None
    path = find_snapshot(path)
    payload = checkpoint.load(path, expect=(SNAPSHOT_FORMAT, checkpoint.CHECKPOINT_FORMAT))  # never runs its code
    if run_dir is not None:
        _note_newer_checkpoint(run_dir, int(payload["step"]))
    if payload["format"] == checkpoint.CHECKPOINT_FORMAT:  # a training checkpoint: its EMAs and online weights
        state = payload["ema"]
        names = state.get("names") or [str(float(d)) for d in state.get("decays", [])]
        weights = {**dict(zip(names, state["shadows"])), "online": payload["model"]}
        default = payload["config"]["train"].get("ema_default")
    else:
        weights, default = payload["ema"], payload.get("ema_default")
    cfg = config_from_dict(payload["config"])
    name = resolve_ema_name(ema, list(weights), default)
    net = build_network(cfg.network.name, **payload["network_kwargs"])
    obj = cfg.objective
    model = wrap_network(net, parameterisation(obj.kind), obj.sigma_data, obj.sigma_min)
    check_finite_weights(weights[name], f"{path}'s {name!r} weights")
    model.load_state_dict(weights[name])
    device = torch.device(device)
    model.to(device).eval()
    return Snapshot(path, model, cfg, payload["codec"], Normalizer.from_dict(payload["normalizer"]).to(device),
                    tuple(payload["latent_shape"]), int(payload["num_classes"]), int(payload["state"]["step"]
                    if "state" in payload else payload["step"]), name, device,
                    data_source=payload.get("data_source"), network_kwargs=payload["network_kwargs"],
                    nimg=payload["state"]["nimg"] if "state" in payload else payload.get("nimg"))


def _note_newer_checkpoint(run_dir: Path, snapshot_step: int) -> None:
    """Say so when a run directory's newest checkpoint is newer than the snapshot taken from it (a run killed
    between the two writes): sampling the run then uses older weights than it trained to."""
    newest = checkpoint.latest_checkpoint(run_dir)
    if newest is None:
        return
    step = int(newest.stem.split("-")[1])
    if step > snapshot_step:
        print(f"note: {run_dir}'s newest snapshot is from step {snapshot_step}, its newest checkpoint from step {step}; "
              f"using the snapshot (pass {newest} to use the checkpoint's weights, or resume the run to write a "
              "snapshot)", file=sys.stderr)


def check_finite_weights(state: dict, what: str) -> None:
    """Refuse a state dict holding NaN or inf: sampling from it gives black images with exit code 0."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{what} hold non-finite values ({bad} of {value.numel()} in {key}): the file is "
                             "damaged (bit rot, a cut transfer) or the run diverged; use another snapshot or --ema")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
