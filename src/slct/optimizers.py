"""The optimisers a run can use (``optim.optimizer``), by name: a registry below both the config and the loop."""

from __future__ import annotations

import torch

# RAdam is the authors' (REFERENCE [8]); Adam is EDM's (Karras et al. 2022, Table 7)
OPTIMIZERS: dict[str, type] = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}
