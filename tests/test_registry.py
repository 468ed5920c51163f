"""Objectives live one per module behind a registry: ObjectiveConfig is composed from their fields, each group is
validated where it lives, and a new objective is one new file plus its preset."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import slct
from slct.config import list_presets, load_preset
from slct.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from slct.objectives.base import REGISTRY, SharedFields


def test_the_config_is_the_shared_fields_then_each_objectives_own():
    names = [f.name for f in dataclasses.fields(ObjectiveConfig)]
    groups = [SharedFields] + [spec.fields for spec in REGISTRY.values() if spec.fields]
    assert names == [f.name for g in groups for f in dataclasses.fields(g)]
    assert len(names) == len(set(names))
    assert set(OBJECTIVES) == {"consistency", "distillation", "edm", "fm", "meanflow", "shortcut", "soflow"}
    # the old flat spellings still resolve (presets, saved configs, --set objective.meanflow_p=...)
    assert ObjectiveConfig(meanflow_p=0.5, s1=80).validate().meanflow_p == 0.5


@pytest.mark.parametrize("field, value, message", [
    ("meanflow_r_fraction", 1.5, "meanflow_r_fraction must be in [0, 1]"),  # meanflow.py
    ("shortcut_max_steps", 3, "shortcut_max_steps must be a power of 2"),  # shortcut.py
    ("edm_p_std", 0.0, "edm_p_std must be > 0"),  # edm.py
    ("c_schedule", "nope", "c_schedule must be one of"),  # consistency.py
    ("coupling", "nope", "coupling must be one of"),  # base.py (shared)
])
def test_each_group_is_validated_by_its_module(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ObjectiveConfig(**{field: value}).validate()


def test_every_method_preset_names_a_registered_objective():
    for name in list_presets("method"):
        kind = load_preset("method", name).get("objective", {}).get("kind", "consistency")
        assert kind in OBJECTIVES, name
        teacher = "runs/ldm" if kind == "distillation" else ""
        assert build_objective(ObjectiveConfig(kind=kind, teacher=teacher), 10).kind == kind


def test_the_public_api_keeps_its_names():
    for name in ("ConsistencyObjective", "EDMObjective", "MeanFlowObjective", "ShortcutObjective", "ObjectiveConfig",
                 "LossTerms", "build_objective", "train", "Objective", "register_objective"):
        assert getattr(slct, name) is not None
    from slct.training import Monitor, TrainState, TrainingDiverged, build_optimizer, open_dataset  # noqa: F401


TOY = '''
from dataclasses import dataclass

import torch

from slct.losses import robust_loss
from slct.objectives.base import LossTerms, Objective, check_positive, per_sample, register_objective


@dataclass
class ToyFields:
    toy_sigma: float = 1.0


def validate_toy(cfg) -> None:
    check_positive("toy_sigma", cfg.toy_sigma)


@register_objective("toy", ToyFields, validate_toy)
class ToyObjective(Objective):
    """Denoising at one noise level: the smallest objective there is."""

    precond_kind = "edm"

    def _terms(self, model, x0, z, step, labels, generator, indices, dropout_seed, c, target=None) -> LossTerms:
        sigma = torch.full((x0.shape[0],), self.cfg.toy_sigma, dtype=x0.dtype, device=x0.device)
        total = robust_loss("l2", model(x0 + per_sample(sigma, x0) * z, sigma, labels), x0, reduction="mean")
        return LossTerms(torch.zeros_like(total), total, total, {"toy": 1.0})
'''


def test_a_new_objective_is_one_module_plus_its_preset(tmp_path):
    """Copy the package, add objectives/toy.py and presets/method/toy.yaml, nothing else: it trains and samples."""
    src = Path(slct.__file__).parent
    pkg = tmp_path / "slct"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "objectives" / "toy.py").write_text(TOY)
    (pkg / "presets" / "method" / "toy.yaml").write_text("description: a toy\nobjective:\n  kind: toy\n"
                                                         "  toy_sigma: 0.5\n  coupling: none\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_WAIT_POLICY": "PASSIVE"}
    run = tmp_path / "run"
    code = textwrap.dedent(f"""
        import slct, slct.objectives as o
        assert slct.__file__.startswith({str(pkg)!r})
        assert "toy" in o.OBJECTIVES and o.ObjectiveConfig().toy_sigma == 1.0
        from slct.cli import main
        raise SystemExit(main(["train", "--preset", "toy", "--data-preset", "digits", "--steps", "3",
                               "--set", "network.name=unet-tiny", "--set", "logging.sample_every_steps=0",
                               "--batch", "8", "--out", {str(run)!r}, "--no-progress"]))
        """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "objective:\n  kind: toy" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in run.glob("snapshot-*.pt")) == ["snapshot-00000003.pt"]
    bad = subprocess.run([sys.executable, "-c", "from slct.config import load_config; "
                          "load_config('toy', 'digits', sets=['objective.toy_sigma=-1'])"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert "toy_sigma must be > 0" in bad.stderr
