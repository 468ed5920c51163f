"""Build the preconditioned model of a run from its config and its data's latent shape."""

from __future__ import annotations

import torch

from slct.precond import wrap_network


def network_kwargs(cfg, latent_shape: tuple[int, ...], num_classes: int) -> dict:
    """The build_network overrides of a run: the data fixes channels, resolution and labels; the config the rest."""
    net = cfg.network
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"square latents are required, got latent shape {tuple(latent_shape)}")
    kwargs = dict(net.options)
    for key, wanted in (("in_channels", channels), ("resolution", height)):
        if key in kwargs and kwargs[key] != wanted:
            raise ValueError(f"network.options.{key}={kwargs[key]} does not match the data's latent shape "
                             f"{tuple(latent_shape)} (needs {key}={wanted})")
        kwargs[key] = wanted
    kwargs["label_dim"] = num_classes
    from slct.objectives import is_flow

    if is_flow(cfg.objective.kind):  # MeanFlow's interval / Shortcut's step size: a second time input
        kwargs["second_time"] = True
    from slct.nn import follow_resolution

    kwargs = follow_resolution(net.name, height, kwargs)  # attention at the same UNet levels on other latent sizes
    for key in ("block_norm", "out_norm", "dropout", "label_dropout"):
        value = getattr(net, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


def build_model(cfg, latent_shape: tuple[int, ...], num_classes: int = 0) -> torch.nn.Module:
    """Backbone (noise-schedule agnostic) wrapped by the preconditioner of the objective's kind (REFERENCE [1])."""
    from slct.nn import build_network

    kwargs = network_kwargs(cfg, latent_shape, num_classes)
    try:
        backbone = build_network(cfg.network.name, **kwargs)
    except ValueError as e:
        raise ValueError(f"network {cfg.network.name!r} does not fit latents of shape {tuple(latent_shape)}: {e}; "
                         "change it with --set network.options.KEY=VALUE (e.g. channel_mult, attn_resolutions) "
                         "or choose another --network") from None
    obj = cfg.objective
    from slct.objectives import parameterisation

    return wrap_network(backbone, parameterisation(obj.kind), obj.sigma_data, obj.sigma_min)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
