"""What a run reports while it trains: the progress bar or plain lines, metrics.jsonl (loss terms, per-noise-band
diagnostics, throughput, events), optional TensorBoard, sample grids and periodic evaluation of the EMA model.
Rank 0 alone writes; the other ranks take part in the reductions."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from slct import checkpoint, distributed
from slct.config import Config
from slct.ema import default_ema
from slct.training.bands import NOISE_BANDS, noise_band
from slct.training.state import TrainState

class Monitor:
    """Progress bar, metrics.jsonl, optional TensorBoard, sample grids and the final plot (rank 0 only writes)."""

    KEYS = ("loss", "consistency", "diffusion")
    SHOWN = (("N", "n_scales"), ("c", "c"), ("mse", "mse"))  # (label, metrics key) beside the loss in progress

    def __init__(self, run_dir: Path, cfg: Config, dataset, active: bool, progress: str, start: int, total: int):
        self.run_dir, self.cfg, self.active, self.progress, self.total = run_dir, cfg, active, progress, total
        self._reset_window(time.time())  # sums, counts and band statistics of the logging window
        self.stats: dict = {}
        self._stage: dict | None = None  # the curriculum stage being tracked (see _track_stage)
        self.bar = None
        self.tb = None
        self._eval_pair = None
        self._dataset, self._decode = dataset, None  # the codec for sample grids and evaluation, built once
        if not active:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            trim_metrics(path, start)  # rows past the checkpoint we resume from are replayed: keep no doubles
        self.metrics = open(path, "a")
        if progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError('logging.tensorboard needs the tensorboard extra: pip install "slct[tensorboard]"') from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def accumulate(self, terms, loss, ot_seconds: float) -> None:
        # kept as tensors: no device sync until the log step
        for key, value in (("loss", loss.detach()), ("consistency", terms.consistency.detach().mean()),
                           ("diffusion", terms.diffusion.detach().mean())):
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.stats = terms.stats
        self.ot_seconds += ot_seconds
        self.count += 1
        if terms.sigma is not None:  # per-noise-band loss sums (device) and counts (CPU)
            band = noise_band(terms.sigma)
            total = terms.total.detach().float()
            sums = torch.zeros(len(NOISE_BANDS), device=total.device).index_add_(0, band.to(total.device), total)
            self.band_sums = sums if self.band_sums is None else self.band_sums + sums
            self.band_counts += torch.bincount(band, minlength=len(NOISE_BANDS))
            self.last_r = (terms.r, band, terms.stats.get("c"))

    def due(self, step: int) -> bool:
        """Whether ``step`` (the step count after the step) writes a metrics row."""
        return step % self.cfg.logging.log_every_steps == 0 or step == self.cfg.train.total_steps

    def step(self, state: TrainState, lr: float, ok: bool, grad_norm: float = float("nan"),
             adam_step: float | None = None) -> None:
        self.steps += 1
        if ok and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        self._track_stage(state.step, grad_norm if ok else float("nan"), adam_step)
        if self.bar is not None:
            self.bar.update(1)
        if not self.due(state.step):
            return
        means = distributed.all_mean(torch.stack([torch.as_tensor(self.sums.get(k, 0.0), dtype=torch.float32)
                                                  for k in self.KEYS]).cpu() / max(self.count, 1))
        now = time.time()
        seconds = max(now - self.t_last, 1e-9)
        steps = max(self.steps, 1)
        record = {"step": state.step, "nimg": state.nimg, **{k: float(v) for k, v in zip(self.KEYS, means)},
                  **{k: float(v) for k, v in self.stats.items()}, "lr": lr,
                  "images_per_s": steps * self.cfg.train.batch_size / seconds, "sec_per_step": seconds / steps,
                  "ot_share": self.ot_seconds / seconds, "bad_steps": state.bad_steps, "time": now,
                  **self._band_record(), **({"adam_step_rms": adam_step} if adam_step is not None else {}),
                  **({"grad_scale": state.grad_scale} if self.cfg.optim.grad_scale_beta > 0 else {})}
        state.wall_seconds += seconds
        self._reset_window(now)
        if not self.active:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        # what the bar and the lines show beside the loss, where the objective logs it (MeanFlow's `mse`: its
        # adaptive-weighted loss sits near 1 by construction)
        shown = {label: f"{record[key]:.4g}" for label, key in self.SHOWN if key in record}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", **shown, img_s=f"{record['images_per_s']:.0f}")
        elif self.progress == "lines":
            extra = "".join(f" {label} {value}" for label, value in shown.items())
            print(f"step {state.step}/{self.total} loss {record['loss']:.4g}{extra} "
                  f"{record['images_per_s']:.0f} img/s", flush=True)
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, state.step)

    def _track_stage(self, step: int, grad_norm: float, adam_step: float | None) -> None:
        """Per curriculum stage (N from the objective's stats): the gradient norms and Adam step sizes seen, written
        as one ``stage`` row of metrics.jsonl when N changes and at the end: how the update size behaves across the
        jumps (docs/training.md)."""
        n = self.stats.get("n_scales")
        if n is None:
            return
        if self._stage is not None and self._stage["n_scales"] != n:
            self._write_stage(step - 1)
        if self._stage is None:
            self._stage = {"n_scales": n, "start": step - 1, "norms": [], "adam": []}
        if math.isfinite(grad_norm):
            self._stage["norms"].append(grad_norm)
        if adam_step is not None and math.isfinite(adam_step):
            self._stage["adam"].append(adam_step)
        if step == self.cfg.train.total_steps:
            self._write_stage(step)

    def _write_stage(self, end: int) -> None:
        s, self._stage = self._stage, None
        if not self.active or not s["norms"]:
            return
        norms = torch.tensor(s["norms"], dtype=torch.float64)
        row = {"stage_n_scales": s["n_scales"], "stage_start": s["start"], "stage_end": end,
               "grad_norm_median": float(norms.median()), "grad_norm_max": float(norms.max()),
               "grad_norm_first": float(norms[: max(1, len(norms) // 10)].mean())}
        if s["adam"]:
            row["adam_step_rms_max"] = max(s["adam"])
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def _reset_window(self, now: float) -> None:
        self.sums, self.count, self.steps, self.ot_seconds, self.t_last = {}, 0, 0, 0.0, now
        self.band_sums, self.band_counts, self.last_r, self.grad_norms = None, torch.zeros(len(NOISE_BANDS)), None, []

    def _band_record(self) -> dict:
        """Diagnostics for when the loss says nothing: the loss per noise band over the logging window, r/(2c^2)
        quantiles per band in the window's last batch (where the Cauchy loss is quadratic, ~1, or logarithmic,
        >> 1) and the mean gradient norm."""
        out: dict = {}
        if self.grad_norms:
            out["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        if self.band_sums is None:
            return out
        sums = distributed.all_sum(self.band_sums.float().cpu())
        counts = distributed.all_sum(self.band_counts.float())
        for (name, _, _), total, n in zip(NOISE_BANDS, sums.tolist(), counts.tolist()):
            if n:
                out[f"loss_sigma_{name}"] = total / n
        r, band, c = self.last_r
        if r is not None and c:
            ratio = (r.detach().double().cpu() / (2 * c * c))
            for i, (name, _, _) in enumerate(NOISE_BANDS):
                values = ratio[band == i]
                if len(values):
                    q50, q90 = torch.quantile(values, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
                    out[f"r2c2_p50_sigma_{name}"], out[f"r2c2_p90_sigma_{name}"] = q50, q90
        return out

    def rewind(self, state: TrainState) -> None:
        """After a rollback: the bar and the throughput window restart from the restored step."""
        self._reset_window(time.time())
        if self.bar is not None:
            self.bar.n = state.step
            self.bar.refresh()

    def event(self, message: str, step: int | None = None, echo: bool = True) -> None:
        """A line in metrics.jsonl (and on the console unless progress is "none" or ``echo`` is False)."""
        if self.active:
            self.metrics.write(json.dumps({"event": message, "event_step": step, "time": time.time()}) + "\n")
            self.metrics.flush()
            if echo and self.progress != "none":
                (self.bar.write if self.bar is not None else print)(message)

    @contextlib.contextmanager
    def _ema_model(self, model, ema):
        """The model in eval mode with the default EMA's weights (``train.ema_default``, as snapshots), restored
        afterwards; yields (EMA name, decode), decode mapping normalised latents to images through the run's codec
        (built once per run)."""
        decay = default_ema(ema.names, self.cfg.train.ema_default)
        backup = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(ema.weights(decay))
        model.eval()
        try:
            device = next(model.parameters()).device
            if self._decode is None:
                from slct.codecs import get_codec

                codec = get_codec(**self._dataset.codec_spec).to(device)
                normalizer = self._dataset.normalizer.to(device)
                self._decode = lambda z: codec.decode(normalizer.denormalize(z))
            yield decay, self._decode
        finally:
            model.load_state_dict(backup)
            model.train()

    @property
    def _class_names(self) -> list[str]:
        return list(getattr(self._dataset, "manifest", {}).get("class_names") or [])

    @torch.no_grad()
    def sample_grids(self, model, ema, step: int, latent_shape) -> None:
        from slct.images import save_grid
        from slct.sampling import default_nfe, labels_for_seeds, sample_latents

        with self._ema_model(model, ema) as (_, decode):
            seeds = list(range(self.cfg.logging.grid_size))
            labels = labels_for_seeds(None, seeds, _num_classes(model))  # class-balanced for a conditional model
            for nfe in default_nfe(self.cfg.objective, self.cfg.sampling):
                z = sample_latents(model, seeds, tuple(latent_shape), nfe, self.cfg.objective, self.cfg.sampling,
                                   labels)
                save_grid(decode(z), self.run_dir / "samples" / f"step-{step:08d}-nfe{nfe}.png")

    @torch.no_grad()
    def evaluate(self, model, ema, step: int, latent_shape) -> None:
        """FD (and precision/recall) of the default EMA model on logging.eval_n samples, per NFE."""
        from slct.eval.evaluate import evaluate_many, extractor_for_reference
        from slct.eval.reference import load_reference
        from slct.sampling import default_nfe, labels_for_seeds, sample_latents

        if self._eval_pair is None:  # loaded once per run
            reference = load_reference(self.cfg.logging.eval_reference)
            self._eval_pair = (extractor_for_reference(reference), reference)
        ref_class = self._eval_pair[1].manifest.get("class")  # a one-class reference: samples of that class
        spec = None if ref_class is None else [str(ref_class)]
        with self._ema_model(model, ema) as (decay, decode):
            row = {"eval_step": step, "eval_n": self.cfg.logging.eval_n, "ema": decay}
            for nfe in default_nfe(self.cfg.objective, self.cfg.sampling):
                def generate(seeds, nfe=nfe):
                    labels = labels_for_seeds(spec, seeds, _num_classes(model), self._class_names)
                    return decode(sample_latents(model, seeds, tuple(latent_shape), nfe, self.cfg.objective,
                                                 self.cfg.sampling, labels))

                (result,) = evaluate_many(generate, self.cfg.logging.eval_n, 64, [self._eval_pair], progress=False)
                row.update({f"{key}_nfe{nfe}": result[key] for key in ("fd", "precision", "recall")
                            if result.get(key) is not None})
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        summary = ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k.startswith("fd_"))
        (self.bar.write if self.bar is not None else print)(f"step {step}: {summary} ({row['eval_n']} samples)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()

    def finish(self, done: bool) -> dict:
        self.metrics.close()
        files = {"metrics": self.run_dir / "metrics.jsonl"}
        if not self.cfg.logging.plot:
            return files
        obj, stages = self.cfg.objective, None
        from slct.objectives import uses_curriculum

        if uses_curriculum(obj):
            from slct.curriculum import curriculum_stages

            stages = [st["start"] for st in curriculum_stages(self.cfg.train.total_steps, obj.s0, obj.s1,
                                                               obj.min_stage_steps)]
        from slct.training.plots import plot_metrics

        plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "training.png", stages)
        if plot:
            files["plot"] = plot
        return files


def _row_step(row: dict) -> int | None:
    for key in ("step", "eval_step", "event_step", "stage_end"):
        if row.get(key) is not None:
            return row[key]
    return None


def _num_classes(model) -> int:
    """Classes of a (preconditioned, possibly compiled or DDP-wrapped) model's network; 0: unconditional."""
    net = getattr(model, "module", model)
    net = getattr(net, "_orig_mod", net)
    return int(getattr(getattr(net, "net", net), "label_dim", 0) or 0)


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``path`` logged after ``step`` (a resume replays them); returns how many were dropped."""
    kept, dropped = [], 0
    for line in open(path):
        if not line.strip():
            continue
        try:
            at = _row_step(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9
            dropped += 1
            continue
        if at is not None and at > step:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        checkpoint.atomic_write(path, lambda f: f.write("".join(kept).encode()), what=f"trimmed {path.name}")
    return dropped


