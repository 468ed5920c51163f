"""Evaluation EMAs of the online weights (REFERENCE [8]). Not the target network: iCT's target EMA is mu = 0."""

from __future__ import annotations

import torch


class EMA:
    """One float32 shadow copy of the parameters and buffers per decay rate."""

    def __init__(self, model: torch.nn.Module, decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.shadows = [{k: v.detach().float().clone() for k, v in model.state_dict().items()} for _ in self.decays]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        for decay, shadow in zip(self.decays, self.shadows):
            keys = [k for k, v in shadow.items() if v.is_floating_point()]
            # shadow <- decay * shadow + (1 - decay) * current, one fused call for all tensors
            torch._foreach_lerp_([shadow[k] for k in keys], [current[k].float() for k in keys], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decays": self.decays, "shadows": self.shadows}

    def load_state_dict(self, state: dict) -> None:
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"checkpoint EMA decays {state['decays']} differ from the config's {self.decays}")
        for shadow, saved in zip(self.shadows, state["shadows"]):
            for k, v in saved.items():
                shadow[k].copy_(v)

    def weights(self, decay: float) -> dict:
        return self.shadows[self.decays.index(float(decay))]
