"""Config: typed dataclasses, presets (method x data), strict overrides, round trips."""

from __future__ import annotations

import math

import pytest
import yaml

from slct.config import Config, config_from_dict, list_presets, load_config, load_preset, parse_set

METHOD_PRESETS = list_presets("method")
DATA_PRESETS = list_presets("data")


def test_the_issue_presets_exist():
    required = {"ilct", "slct", "ladder-cauchy", "ladder-diff", "ladder-ot", "ladder-adaptive-c", "ladder-nsln",
                "loss-l2", "loss-pseudo-huber", "loss-geman-mcclure", "loss-cauchy", "norm-group", "norm-instance",
                "norm-layer", "norm-rms", "norm-nonscaling-layer", "diff-r1.0", "diff-r0.6", "diff-r0.25", "ldm"}
    assert required <= set(METHOD_PRESETS)
    assert {"celebahq256", "ffhq256", "lsunchurch256", "utkface64", "digits"} <= set(DATA_PRESETS)


@pytest.mark.parametrize("method", METHOD_PRESETS)
@pytest.mark.parametrize("data", DATA_PRESETS)
def test_every_preset_combination_resolves(method, data):
    needs_teacher = load_preset("method", method).get("objective", {}).get("kind") == "distillation"
    if needs_teacher:  # distillation names its teacher run on the command line; without one: one line
        with pytest.raises(ValueError, match="consistency distillation needs a teacher: pass --teacher RUN"):
            load_config(method, data)
    cfg = load_config(method, data, sets=["objective.teacher=runs/ldm"] if needs_teacher else [])
    cfg.validate()
    assert cfg.preset == f"{method} x {data}"


def test_ilct_is_ict_in_latent_space():
    o = load_config("ilct").objective
    n = load_config("ilct").network
    assert (o.loss, o.c_schedule, o.diffusion_r, o.coupling) == ("pseudo_huber", "fixed", 0.0, "none")
    assert (n.block_norm, n.out_norm) == ("group", "group")


def test_slct_is_the_full_recipe():
    cfg = load_config("slct")
    o = cfg.objective
    assert (o.loss, o.c_schedule, o.diffusion_r, o.diffusion_weight, o.coupling) == ("cauchy", "adaptive", 0.25, 5.0, "ot")
    assert (cfg.network.block_norm, cfg.network.out_norm) == ("nonscaling-layer", "nonscaling-layer")


def test_the_ladder_adds_one_change_per_rung():
    expected = {  # Table 2a: each rung adds exactly one idea to the one before
        "ladder-cauchy": {"objective.loss"},
        "ladder-diff": {"objective.diffusion_r"},
        "ladder-ot": {"objective.coupling"},
        "ladder-adaptive-c": {"objective.c_schedule"},
        "ladder-nsln": {"network.block_norm", "network.out_norm"},
    }
    previous = load_config("ilct").to_dict()
    for rung, change in expected.items():
        current = load_config(rung).to_dict()
        changed = {f"{s}.{k}" for s in ("objective", "network", "optim", "train", "data")
                   for k in current[s] if current[s][k] != previous[s][k]}
        assert changed == change, rung
        previous = current
    strip = lambda d: {k: v for k, v in d.items() if k != "preset"}  # noqa: E731
    assert strip(load_config("ladder-nsln").to_dict()) == strip(load_config("slct").to_dict())
    assert strip(load_config("ladder-adaptive-c").to_dict()) == strip(load_config("norm-group").to_dict())


def test_ablation_rows_change_only_their_knob():
    base = load_config("slct")
    assert load_config("loss-geman-mcclure").objective.loss == "geman_mcclure"
    assert load_config("norm-rms").network.block_norm == "rms"
    assert load_config("diff-r0.6").objective.diffusion_r == 0.6
    row = load_config("diff-r1.0")
    row.objective.diffusion_r = base.objective.diffusion_r
    row.preset = base.preset
    assert row == base


def test_ldm_is_the_edm_baseline_with_the_same_network():
    cfg = load_config("ldm", "celebahq256")
    assert cfg.objective.kind == "edm" and cfg.network.name == "unet-paper"
    assert cfg.network.block_norm == "group"


def test_data_presets_carry_the_authors_settings():
    c = load_config("slct", "celebahq256")
    assert (c.train.batch_size, c.network.name, c.data.normalization) == (128, "unet-paper", "per-element")
    assert c.train.total_steps == math.ceil(1400 * 27_000 / 128)
    assert c.train.ema_decays == [0.9999, 0.99993]
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (1e-4, 1e-4, 0.0)
    assert load_config("slct", "lsunchurch256").sampling.sigma_mid == pytest.approx(0.5285640, rel=1e-6)
    assert load_config("slct", "celebahq256").sampling.sigma_mid == pytest.approx(0.3693155, rel=1e-6)


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"batch_size": 32, "seed": 3}}))
    cfg = load_config("slct", "celebahq256", f, ["train.seed=7"], {"train": {"total_steps": 10}})
    assert (cfg.train.batch_size, cfg.train.seed, cfg.train.total_steps) == (32, 7, 10)


@pytest.mark.parametrize("expr,match", [
    ("objective.los=cauchy", "unknown config key 'objective.los'"),
    ("nonsense.x=1", "unknown config key 'nonsense'"),
    ("train.batch_size=abc", "train.batch_size: expected int"),
    ("train.batch_size=1.5", "train.batch_size: expected int"),
    ("train.compile=3", "train.compile: expected bool"),
    ("objective.loss=huber", "loss must be one of"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("train.prefetch_batches=-2", "train.prefetch_batches must be >= -1"),
])
def test_overrides_are_strict(expr, match):
    with pytest.raises(ValueError, match=match):
        load_config("slct", sets=[expr])


def test_the_objectives_without_a_curriculum_share_one_base():
    """ldm, meanflow, shortcut, soflow extend the hidden ``_no-curriculum`` base: GroupNorm, no OT, no diffusion
    term, a data preset's stage-jump remedies off; the base itself is neither listed nor trainable."""
    assert not any(name.startswith("_") for name in list_presets("method"))
    with pytest.raises(ValueError, match="unknown method preset '_no-curriculum'"):
        load_preset("method", "_no-curriculum")
    for name in ("ldm", "meanflow", "shortcut", "soflow"):
        cfg = load_config(name, "utkface64")
        assert (cfg.network.block_norm, cfg.network.out_norm, cfg.objective.coupling) == ("group", "group", "none")
        assert (cfg.objective.diffusion_r, cfg.optim.stage_warmup_steps, cfg.optim.grad_scale_beta) == (0, 0, 0)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: .*ilct"):
        load_preset("method", "ict")


def test_set_parses_yaml_values():
    assert parse_set("train.ema_decays=[0.9, 0.99]") == {"train": {"ema_decays": [0.9, 0.99]}}
    assert parse_set("objective.c0=null") == {"objective": {"c0": None}}
    assert parse_set("optim.lr=2e-4") == {"optim": {"lr": 2e-4}}  # YAML 1.1 would read a string
    cfg = load_config("slct", sets=["objective.c0=0.01", "optim.lr=2e-4", "network.options={model_channels: 64}"])
    assert cfg.objective.c0 == 0.01 and cfg.optim.lr == 2e-4 and cfg.network.options == {"model_channels": 64}


def test_config_round_trips_through_a_dict():
    cfg = load_config("slct", "utkface64", sets=["network.options={channel_mult: [1, 2]}"])
    back = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert back == cfg
    assert isinstance(Config().objective.sigma_data, float)
