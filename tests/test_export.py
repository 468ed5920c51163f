"""`slct export RUN --format diffusers OUT`: diffusers loads the folder and samples what `slct sample` samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slct.cli import main
from slct.config import load_config
from slct.training import train
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "logging.log_every_steps=5", "train.device=cpu", "checkpoint.every_steps=1000",
        "train.batch_size=16"]


def _slct_samples(run, tmp_path, nfe, n=6, extra=()):
    out = tmp_path / f"slct-samples-{nfe}"
    assert main(["sample", str(run), "--n", str(n), "--nfe", str(nfe), "--format", "npz", "--out", str(out),
                 *extra]) == 0
    return np.load(out / f"samples-nfe{nfe}.npz")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits")
    train(load_config("slct", "digits", sets=[*TINY, "train.total_steps=6"]), run, progress=False)
    return run


def test_exported_digits_pipeline_samples_what_slct_samples(digits_run, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "pipe"
    assert main(["export", str(digits_run), str(out), "--format", "diffusers"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SLCTPipeline"]
    assert {"denoiser", "scheduler", "codec"} <= set(index)
    assert (out / "denoiser" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors and JSON only

    # the generic loader finds the class through pipeline.py (diffusers asks to trust any folder's code)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, use_safetensors=True)
    assert type(pipe).__name__ == "SLCTPipeline"
    from slct.diffusers_pipeline import load_pipeline

    direct = load_pipeline(out)  # the same components, no file of the folder executed
    np.testing.assert_array_equal(direct(seeds=range(6), num_inference_steps=1, output_type="np").images,
                                  pipe(seeds=range(6), num_inference_steps=1, output_type="np").images)
    for nfe in (1, 2):
        expected = _slct_samples(digits_run, tmp_path, nfe)
        got = pipe(seeds=range(6), num_inference_steps=nfe, output_type="np").images
        np.testing.assert_array_equal(got, expected["images"])
    assert pipe.scheduler.sigmas(2) == pytest.approx([80.0, 0.36931547703985584])
    images = pipe(seeds=[3], num_inference_steps=1).images
    assert images[0].size == (8, 8) and images[0].mode == "L"  # PIL, grey digits at 8 px


def test_a_pickled_bin_in_an_exported_folder_is_never_loaded(digits_run, tmp_path):
    """A shared folder whose denoiser weights are a pickle (``.bin``): diffusers' generic loader would read it when
    not told ``use_safetensors=True``; slct's components refuse it however they are loaded."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from slct.diffusers_pipeline import SLCTDenoiser, load_pipeline

    out = tmp_path / "pipe"
    assert main(["export", str(digits_run), str(out), "--format", "diffusers"]) == 0
    weights = out / "denoiser" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), out / "denoiser" / "diffusion_pytorch_model.bin")  # the same tensors, pickled
    weights.unlink()
    for load in (lambda: DiffusionPipeline.from_pretrained(out, trust_remote_code=True),  # no use_safetensors
                 lambda: SLCTDenoiser.from_pretrained(out / "denoiser"), lambda: load_pipeline(out)):
        with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
            load()
    with pytest.raises(ValueError, match="safetensors only"):
        SLCTDenoiser.from_pretrained(out / "denoiser", use_safetensors=False)


def test_export_with_an_sd_vae_shaped_codec(tmp_path):
    """A latent dataset encoded with a small random AutoencoderKL (the SD-VAE's architecture), trained 4 steps."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    latents = tmp_path / "latents"
    assert main(["encode", str(images), "--codec", "sd-vae-ft-ema", "--vae", str(tmp_path / "vae"),
                 "--resolution", "16", "--out", str(latents), "--no-progress"]) == 0
    run = tmp_path / "run"
    cfg = load_config("slct", "digits", sets=[*TINY, "train.total_steps=4", f"data.path={latents}",
                                              "network.options.attn_resolutions=[]"])
    train(cfg, run, progress=False)
    out = tmp_path / "pipe"
    assert main(["export", str(run), str(out)]) == 0
    assert (out / "codec" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, use_safetensors=True)
    expected = _slct_samples(run, tmp_path, 1, n=4)
    got = pipe(seeds=range(4), num_inference_steps=1, output_type="np").images
    assert got.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(got, expected["images"])


def test_export_refuses_a_non_empty_folder(digits_run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["export", str(digits_run), str(tmp_path / "busy")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_export_of_a_flow_model_samples_what_slct_samples(tmp_path):
    from slct.diffusers_pipeline import load_pipeline

    run = tmp_path / "shortcut"
    train(load_config("shortcut", "digits", sets=[*TINY, "train.total_steps=3"]), run, progress=False)
    assert main(["export", str(run), str(tmp_path / "pipe")]) == 0
    pipe = load_pipeline(tmp_path / "pipe")
    assert pipe.scheduler.sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    for nfe in (1, 4):
        expected = _slct_samples(run, tmp_path, nfe, n=4)
        np.testing.assert_array_equal(pipe(seeds=range(4), num_inference_steps=nfe, output_type="np").images,
                                      expected["images"])
