"""A trained slct model as a diffusers pipeline: ``slct export RUN --format diffusers OUT``.

The folder holds ``model_index.json``, ``pipeline.py`` (one line that imports :class:`SLCTPipeline` from slct) and
three components, each saved with diffusers' own ``save_pretrained`` (config JSON + safetensors):

- ``denoiser`` (:class:`SLCTDenoiser`): the network with its preconditioning (the chosen EMA's weights), the
  latent shape and the classes;
- ``scheduler`` (:class:`SLCTScheduler`): the sampler's noise levels (consistency: sigma_max, the 2-step
  sigma_mid, sigma_min; ldm: EDM's Heun/Euler grid);
- ``codec`` (:class:`SLCTCodec`): the decoder (TAEF2, an SD ``AutoencoderKL`` or pixels) and the run's latent
  normalisation.

With slct installed, ``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`` loads it (diffusers asks for
``trust_remote_code`` for any folder with a ``pipeline.py``; this one is a single import line), and
:func:`load_pipeline` loads the same components without running any file from the folder.
``pipe(seeds=[...], num_inference_steps=1)`` runs slct's own samplers, so it returns the images ``slct sample``
writes for the same seeds. Nothing is pickled: weights are safetensors, configs are JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from slct.compat import ensure_torchvision

ensure_torchvision()  # before diffusers' lazy imports reach torchvision (see slct.compat)

from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: E402,F401 (diffusers looks
from diffusers.configuration_utils import register_to_config  # noqa: E402  (the loader classes up in this module
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402  by name)

PIPELINE_FILE = "pipeline"  # OUT/pipeline.py, named in model_index.json so DiffusionPipeline finds the class


class _SafetensorsOnly:
    """Components load from safetensors only, however they are reached: diffusers' generic loader falls back to a
    ``.bin`` (a pickle, which runs code when loaded) unless told ``use_safetensors=True``; a shared folder may hold
    one, so these classes insist on safetensors themselves."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls.__name__} loads safetensors only: a .bin weights file is a pickle, which runs "
                             "code when loaded")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(*args, **kwargs)


class SLCTDenoiser(_SafetensorsOnly, ModelMixin, ConfigMixin):
    """An slct backbone inside its objective's parameterisation: ``f(x, sigma, class_labels)`` (consistency, EDM) or
    the average velocity ``u(x, t, class_labels, h)`` (MeanFlow, Shortcut)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, network: str = "unet-tiny", network_kwargs: dict | None = None, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, kind: str = "consistency", latent_shape: list | None = None,
                 num_classes: int = 0, class_names: list | None = None):
        super().__init__()
        from slct.nn import build_network
        from slct.objectives import parameterisation
        from slct.precond import wrap_network

        self.model = wrap_network(build_network(network, **(network_kwargs or {})), parameterisation(kind), sigma_data,
                                  sigma_min)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, *args) -> torch.Tensor:
        return self.model(x, sigma, class_labels, *args)


class SLCTScheduler(SchedulerMixin, ConfigMixin):
    """The noise levels of slct's samplers; ``sigmas(num_inference_steps)`` lists them (see slct.sampling); for the
    flow objectives (MeanFlow, Shortcut) they are the times 1, 1 - 1/k, ..., 1/k of the k equal steps."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, kind: str = "consistency", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, sigma_mid: float = 0.36931547703985584, ldm_solver: str = "heun",
                 ldm_steps: int = 18, flow_solver: str = "map"):
        pass

    def configs(self) -> tuple[SimpleNamespace, SimpleNamespace]:
        c = self.config
        return (SimpleNamespace(kind=c.kind, sigma_min=c.sigma_min, sigma_max=c.sigma_max, rho=c.rho),
                SimpleNamespace(sigma_mid=c.sigma_mid, ldm_solver=c.ldm_solver, ldm_steps=c.ldm_steps,
                                flow_solver=getattr(c, "flow_solver", "map")))

    def sigmas(self, num_inference_steps: int) -> list[float]:
        """The noise levels the network is evaluated at for ``num_inference_steps`` NFE."""
        from slct.sampling import consistency_sigmas
        from slct.sigmas import karras_sigmas

        c = self.config
        from slct.objectives import parameterisation

        wrapper = parameterisation(c.kind)
        if wrapper == "flow":
            solver = getattr(c, "flow_solver", "map")
            steps = num_inference_steps if solver != "heun" else (num_inference_steps + 1) // 2
            return [1 - i / steps for i in range(steps)]
        if wrapper == "edm":
            steps = num_inference_steps if c.ldm_solver == "euler" else (num_inference_steps + 1) // 2
            return karras_sigmas(steps, c.sigma_min, c.sigma_max, c.rho).double().flip(0).tolist()
        return consistency_sigmas(num_inference_steps, c.sigma_max, c.sigma_mid, c.sigma_min, rho=c.rho)

    def default_steps(self) -> list[int]:
        from slct.sampling import default_nfe

        return default_nfe(*self.configs())


class SLCTCodec(_SafetensorsOnly, ModelMixin, ConfigMixin):
    """Latents -> images: the run's normalisation undone, then its codec's decoder (``decode``: [-1, 1])."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, codec: dict | None = None, normalizer: dict | None = None, vae_config: dict | None = None):
        super().__init__()
        name = (codec or {"name": "identity"})["name"]
        # a codec without weights (pixels) still writes a safetensors file, so loading never looks for a pickle
        self.register_buffer("export_format", torch.tensor(1))
        self.parts = torch.nn.ModuleDict()
        if name == "taef2":
            from slct.codecs.taef2 import make_decoder, make_encoder

            self.parts["encoder"], self.parts["decoder"] = make_encoder(), make_decoder()
        elif name.startswith("sd-vae"):
            from diffusers import AutoencoderKL

            self.parts["vae"] = AutoencoderKL.from_config(vae_config)
        self._codec = None

    def codec(self):
        """slct's codec object around this component's networks (built once, after the weights are loaded)."""
        if self._codec is None:
            from slct.codecs import get_codec

            spec = dict(self.config.codec)
            if spec["name"] == "taef2":
                from slct.codecs.taef2 import TAEF2Codec

                self._codec = TAEF2Codec.from_modules(self.parts["encoder"], self.parts["decoder"])
            elif spec["name"].startswith("sd-vae"):
                from slct.codecs.sdvae import SDVAECodec

                self._codec = SDVAECodec.from_vae(self.parts["vae"], spec["name"], spec.get("posterior", "sample"),
                                                  spec.get("pretrained"))
            else:
                self._codec = get_codec(**spec)
        return self._codec

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from slct.data import Normalizer

        normalizer = Normalizer.from_dict(self.config.normalizer).to(latents.device)
        return self.codec().decode(normalizer.denormalize(latents))


class SLCTPipeline(DiffusionPipeline):
    """One- and few-step generation with an slct model: ``pipe(seeds=range(16), num_inference_steps=1).images``.

    Sample i depends on ``seeds[i]`` alone (as in ``slct sample``); conditional models take ``class_labels``
    ("balanced", "random", "none", or class names / ids as in ``slct sample --labels``); ``guidance_scale`` is
    classifier-free guidance for the ldm baseline only. ``output_type``: "pil" (default), "np" (uint8 NHWC),
    "pt" (float NCHW in [-1, 1]).
    """

    model_cpu_offload_seq = "denoiser->codec"

    def __init__(self, denoiser: SLCTDenoiser, scheduler: SLCTScheduler, codec: SLCTCodec):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, codec=codec)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, seeds=None,
                 class_labels=None, guidance_scale: float = 1.0, output_type: str = "pil",
                 return_dict: bool = True):
        from slct.images import to_uint8
        from slct.sampling import check_guidance, labels_for_seeds, sample_latents

        seeds = list(range(batch_size)) if seeds is None else [int(s) for s in seeds]
        cfg = self.denoiser.config
        nfe = num_inference_steps or self.scheduler.default_steps()[0]
        objective, sampling = self.scheduler.configs()
        check_guidance(guidance_scale, objective.kind, cfg.num_classes,
                       float(getattr(self.denoiser.model.net, "label_dropout", 0.0) or 0.0))
        labels = labels_for_seeds(class_labels, seeds, cfg.num_classes, cfg.class_names or [])
        device = next(self.denoiser.parameters()).device
        z = sample_latents(self.denoiser.model.eval(), seeds, tuple(cfg.latent_shape), nfe, objective, sampling,
                           labels, device, guidance_scale)
        images = self.codec.decode(z)
        if output_type == "pt":
            out: Any = images
        elif output_type in ("np", "pil"):
            out = to_uint8(images)  # slct's rounding: the PNGs `slct sample` writes
            if output_type == "pil":
                import PIL.Image

                out = [PIL.Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in out]
        else:
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu") -> SLCTPipeline:
    """An exported folder as an :class:`SLCTPipeline`, built from its components (no code from the folder runs)."""
    folder = Path(folder)
    pipe = SLCTPipeline(denoiser=SLCTDenoiser.from_pretrained(folder / "denoiser", use_safetensors=True),
                        scheduler=SLCTScheduler.from_pretrained(folder / "scheduler"),
                        codec=SLCTCodec.from_pretrained(folder / "codec", use_safetensors=True))
    return pipe.to(device)


def export_diffusers(snapshot: str | Path, out: str | Path, ema: str | None = None) -> Path:
    """Write ``snapshot`` (a snapshot, run directory or checkpoint) as a diffusers pipeline folder ``out``."""
    from slct import checkpoint
    from slct.sampling import find_snapshot, load_snapshot

    path = find_snapshot(snapshot)
    snap = load_snapshot(path, ema=ema)
    payload = checkpoint.load(path, expect=(checkpoint.SNAPSHOT_FORMAT, checkpoint.CHECKPOINT_FORMAT))
    network_kwargs = payload["network_kwargs"]  # snapshots and checkpoints both carry it
    obj, samp = snap.config.objective, snap.config.sampling
    denoiser = SLCTDenoiser(network=snap.config.network.name, network_kwargs=network_kwargs,
                            sigma_data=obj.sigma_data, sigma_min=obj.sigma_min, kind=obj.kind,
                            latent_shape=list(snap.latent_shape), num_classes=snap.num_classes,
                            class_names=snap.class_names)
    denoiser.model.load_state_dict(snap.model.state_dict())
    scheduler = SLCTScheduler(kind=obj.kind, sigma_min=obj.sigma_min, sigma_max=obj.sigma_max, rho=obj.rho,
                              sigma_mid=samp.sigma_mid, ldm_solver=samp.ldm_solver, ldm_steps=samp.ldm_steps,
                              flow_solver=samp.flow_solver)
    source = snap.codec
    vae_config = dict(source.vae.config) if hasattr(source, "vae") else None
    codec = SLCTCodec(codec=snap.codec_spec, normalizer=snap.normalizer.to_dict(), vae_config=vae_config)
    if "encoder" in codec.parts:
        codec.parts["encoder"].load_state_dict(source.encoder.state_dict())
        codec.parts["decoder"].load_state_dict(source.decoder.state_dict())
    elif "vae" in codec.parts:
        codec.parts["vae"].load_state_dict(source.vae.state_dict())
    pipe = SLCTPipeline(denoiser=denoiser, scheduler=scheduler, codec=codec)
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = [PIPELINE_FILE, "SLCTPipeline"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / f"{PIPELINE_FILE}.py").write_text(
        '"""The slct pipeline class (shipped with slct: `pip install slct`)."""\n\n'
        "from slct.diffusers_pipeline import SLCTPipeline  # noqa: F401\n")
    (out / "slct_export.json").write_text(json.dumps(dict(
        snapshot=str(path.resolve()), step=snap.step, ema=snap.ema, codec=snap.codec_spec,
        config=snap.config.to_dict()), indent=2, default=str) + "\n")
    return out
