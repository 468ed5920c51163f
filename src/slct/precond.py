"""Preconditioning: the consistency / denoiser parameterisation around a backbone (REFERENCE.md [1]).

``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["FlowModel", "PARAMETERISATIONS", "PRECOND_KINDS", "Precond", "PrecondModel", "wrap_network"]

Sigma = torch.Tensor | float


def _consistency_skip_out(sigma, sigma_data: float, sigma_min: float):
    # iCT / CM (paper eq. 2): c_skip(s_min) = 1 and c_out(s_min) = 0 exactly, the boundary condition
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _edm_skip_out(sigma, sigma_data: float, sigma_min: float):
    # EDM (Karras et al. 2022, Table 1): the diffusion baseline's denoiser, no boundary condition
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


# kind -> (sigma, sigma_data, sigma_min) -> (c_skip, c_out)
PRECOND_KINDS: dict[str, Callable] = {
    "consistency": _consistency_skip_out,
    "edm": _edm_skip_out,
}


PARAMETERISATIONS = (*PRECOND_KINDS, "flow")  # what an objective's precond_kind may be


class Precond:
    """The scalings ``c_skip, c_out, c_in, c_noise`` of one parameterisation.

    ``kind``: "consistency" (default; iCT's, used by sLCT) or "edm" (the diffusion baseline).
    Every method takes ``sigma`` as a tensor of any shape (or a float) and returns a tensor of
    the same shape, in ``sigma``'s floating dtype (float32 for a float).
    """

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, kind: str = "consistency"):
        if kind not in PRECOND_KINDS:
            raise ValueError(f"kind must be one of {sorted(PRECOND_KINDS)}, got {kind!r}")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be finite and > 0, got {sigma_data}")
        if not (math.isfinite(sigma_min) and sigma_min > 0):
            raise ValueError(f"sigma_min must be finite and > 0, got {sigma_min}")
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.kind = kind

    def __repr__(self) -> str:
        return f"Precond(sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, kind={self.kind!r})"

    @staticmethod
    def _as_tensor(sigma: Sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return sigma if sigma.is_floating_point() else sigma.to(torch.float32)

    def c_skip(self, sigma: Sigma) -> torch.Tensor:
        return PRECOND_KINDS[self.kind](self._as_tensor(sigma), self.sigma_data, self.sigma_min)[0]

    def c_out(self, sigma: Sigma) -> torch.Tensor:
        return PRECOND_KINDS[self.kind](self._as_tensor(sigma), self.sigma_data, self.sigma_min)[1]

    def c_in(self, sigma: Sigma) -> torch.Tensor:
        # unit-variance network input for data of std sigma_data
        sigma = self._as_tensor(sigma)
        return (sigma**2 + self.sigma_data**2).rsqrt()

    def c_noise(self, sigma: Sigma) -> torch.Tensor:
        # authors' code: 1000 * 0.25 ln(sigma), fed to a sinusoidal positional embedding
        return 250 * self._as_tensor(sigma).log()


class PrecondModel(torch.nn.Module):
    """``f(x, sigma) = c_skip x + c_out net(c_in x, c_noise, class_labels)`` (REFERENCE.md [1]).

    ``net(x, noise_labels, class_labels=None)`` is the backbone; it receives ``noise_labels`` of
    shape ``(B,)``. ``sigma`` may be a scalar, or have B elements in any shape (``(B,)``,
    ``(B, 1, 1, 1)``). The scalings are applied in float32 (float64 if ``x`` is float64) and the
    backbone's output is cast back, so the backbone may run under bf16/fp16 autocast. At
    ``sigma == sigma_min`` with the "consistency" kind, ``f(x) == x`` exactly.
    """

    def __init__(self, net: torch.nn.Module, precond: Precond | None = None):
        super().__init__()
        self.net = net
        self.precond = precond if precond is not None else Precond()

    def forward(self, x: torch.Tensor, sigma: Sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim < 1:
            raise ValueError(f"x must be batch-first (B, ...), got shape {tuple(x.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1)
        if sigma.numel() not in (1, batch):
            raise ValueError(f"sigma must be a scalar or have B={batch} elements, got {sigma.numel()}")
        sigma = sigma.expand(batch)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # broadcast over the sample dims
        p = self.precond
        out = self.net(p.c_in(s) * x, p.c_noise(sigma), class_labels)
        return p.c_skip(s) * x + p.c_out(s) * out.to(dtype)


class FlowModel(torch.nn.Module):
    """``u(x, t, h) = net(x, time_scale t, class_labels, time_scale h)``: the average velocity over [t - h, t].

    The flow path is ``x_t = (1 - t) x_0 + t e`` (t = 1: noise, t = 0: data), whose velocity is ``v = e - x_0``;
    a step of size h goes from t to t - h as ``x_{t-h} = x_t - h u(x_t, t, h)``. MeanFlow's u(z, r, t) is
    ``u(z, t, t - r)`` here; a shortcut model's s(x_t, t, d) is ``u(x_t, t, d)``; h = 0 is the instantaneous
    velocity. Times are scaled by ``time_scale`` (1000, as DiT/SiT feed t) before the network's embedding; the
    network needs ``second_time=True``. There is no skip connection: the output is the velocity itself.
    """

    def __init__(self, net: torch.nn.Module, time_scale: float = 1000.0):
        super().__init__()
        self.net = net
        self.time_scale = float(time_scale)

    def forward(self, x: torch.Tensor, t: Sigma, class_labels: torch.Tensor | None = None,
                h: Sigma | None = None) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        batch = x.shape[0]

        def per_sample(v, name):
            v = torch.as_tensor(v, device=x.device).to(dtype).reshape(-1)
            if v.numel() not in (1, batch):
                raise ValueError(f"{name} must be a scalar or have B={batch} elements, got {v.numel()}")
            return v.expand(batch)

        t = per_sample(t, "t")
        h = torch.zeros_like(t) if h is None else per_sample(h, "h")
        return self.net(x, self.time_scale * t, class_labels, self.time_scale * h).to(dtype)


def wrap_network(net: torch.nn.Module, parameterisation: str, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """The backbone inside a parameterisation (an objective class's ``precond_kind``; for a config,
    ``slct.objectives.parameterisation(kind)``): "consistency" or "edm" (:class:`PrecondModel`) or "flow"
    (:class:`FlowModel`). This module knows nothing of the objectives built on it."""
    if parameterisation == "flow":
        return FlowModel(net)
    if parameterisation not in PRECOND_KINDS:
        raise ValueError(f"parameterisation must be one of {', '.join(PARAMETERISATIONS)}, got {parameterisation!r}")
    return PrecondModel(net, Precond(sigma_data=sigma_data, sigma_min=sigma_min, kind=parameterisation))
