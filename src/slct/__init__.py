"""slct: latent consistency models trained with the sLCT recipe (Dao et al., ICLR 2025).

The public API is re-exported here lazily, so ``import slct`` stays cheap and each name is
imported from the module that owns it the first time it is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # the method's math (REFERENCE.md [1]-[5])
    "karras_sigmas": "slct.sigmas",
    "ct_weight": "slct.sigmas",
    "num_scales": "slct.curriculum",
    "stage_length_steps": "slct.curriculum",
    "timestep_probabilities": "slct.curriculum",
    "sample_timestep_indices": "slct.curriculum",
    "c_schedule": "slct.curriculum",
    "diffusion_loss_mask": "slct.curriculum",
    "robust_loss": "slct.losses",
    "register_loss": "slct.losses",
    "LOSSES": "slct.losses",
    "ot_coupling": "slct.coupling",
    "Precond": "slct.precond",
    "PrecondModel": "slct.precond",
    "ObjectiveConfig": "slct.objectives",
    "LossTerms": "slct.objectives",
    "ConsistencyObjective": "slct.objectives",
    "EDMObjective": "slct.objectives",
    "MeanFlowObjective": "slct.objectives",
    "ShortcutObjective": "slct.objectives",
    "build_objective": "slct.objectives",
    "Objective": "slct.objectives",
    "register_objective": "slct.objectives",
    "FlowModel": "slct.precond",
    # networks (REFERENCE.md [6])
    "build_network": "slct.nn",
    "norm_layer": "slct.nn",
    "NETWORK_PRESETS": "slct.nn",
    "NORMS": "slct.nn",
    # latent data (REFERENCE.md [7])
    "get_codec": "slct.codecs",
    "CODECS": "slct.codecs",
    "Normalizer": "slct.data",
    "LatentDataset": "slct.data",
    "InfiniteSampler": "slct.data",
    "encode_dataset": "slct.data",
    # evaluation (REFERENCE.md [10])
    "get_extractor": "slct.eval",
    "FeatureStats": "slct.eval",
    "frechet_distance": "slct.eval",
    "precision_recall": "slct.eval",
    # training system
    "TrainConfig": "slct.config",
    "load_config": "slct.config",
    "train": "slct.training",
    "load_snapshot": "slct.sampling",
    "sample_latents": "slct.sampling",
    "flow_sample": "slct.sampling",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slct' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(__all__)
