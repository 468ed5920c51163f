"""FD-DINOv2: timm's DINOv2 ViT with weights from a user file (random weights here: no download)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from slct.compat import import_module
from slct.eval import get_extractor
from slct.eval.dinov2 import VARIANTS, load_dinov2, resample_positions

# Meta's dinov2_vitl14_pretrain.pth: a few keys with their published shapes (37 x 37 + 1 positions at 518 px)
PUBLISHED_VITL14 = {
    "cls_token": (1, 1, 1024),
    "pos_embed": (1, 1370, 1024),
    "mask_token": (1, 1024),
    "patch_embed.proj.weight": (1024, 3, 14, 14),
    "blocks.0.attn.qkv.weight": (3072, 1024),
    "blocks.0.ls1.gamma": (1024,),
    "blocks.23.mlp.fc1.weight": (4096, 1024),
    "norm.weight": (1024,),
}


def _meta_checkpoint(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in Meta's released layout (518 px positions, mask_token) with random values."""
    timm = import_module("timm")
    torch.manual_seed(seed)
    net = timm.create_model(VARIANTS[model].timm_name, pretrained=False, num_classes=0)  # img_size 518
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["mask_token"] = torch.zeros(1, VARIANTS[model].dim)
    for key in state:
        if key.endswith("ls1.gamma") or key.endswith("ls2.gamma"):
            state[key] = torch.rand_like(state[key])  # timm initialises layer scales at 1e-5: make blocks count
    return state


def test_vitl14_has_metas_published_layout():
    timm = import_module("timm")
    with torch.device("meta"):
        net = timm.create_model(VARIANTS["vitl14"].timm_name, pretrained=False, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for key, shape in PUBLISHED_VITL14.items():
        if key != "mask_token":
            assert shapes[key] == shape, key
    # Meta's ViT-L/14 has 304,368,640 parameters, its 1024-d mask_token (training only) included
    assert sum(int(np.prod(s)) for s in shapes.values()) + 1024 == 304_368_640
    assert VARIANTS["vitl14"].dim == 1024 and VARIANTS["vitl14"].url.endswith("dinov2_vitl14/dinov2_vitl14_pretrain.pth")


def _cubic_1d(values: np.ndarray, out_size: int, scale: float, a: float = -0.75) -> np.ndarray:
    """Cubic convolution (Keys, a = -0.75, edge samples repeated) sampling at (i + 0.5) / scale - 0.5."""
    def w(t):
        t = abs(t)
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0

    out = np.empty(out_size)
    for i in range(out_size):
        x = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(x))
        out[i] = sum(values[min(max(j, 0), len(values) - 1)] * w(x - j) for j in range(x0 - 1, x0 + 3))
    return out


def test_positions_are_resampled_as_dinov2_does():
    d = 4
    rng = np.random.default_rng(0)
    profile = rng.normal(size=37)  # varies along one axis only: a 1-d problem
    grid37 = torch.from_numpy(profile).float().view(1, 37, 1, 1).expand(1, 37, 37, d)
    pos = torch.cat([torch.full((1, 1, d), 7.0), grid37.reshape(1, 37 * 37, d)], dim=1)
    out = resample_positions(pos, 16)
    assert out.shape == (1, 257, d) and torch.equal(out[:, 0], pos[:, 0])  # the class token's position is kept
    # DINOv2 passes scale_factor (16 + 0.1) / 37, not size=16: the samples sit at (i + 0.5) * 37 / 16.1 - 0.5
    expected = _cubic_1d(profile, 16, 16.1 / 37)
    np.testing.assert_allclose(out[0, 1:, 0].view(16, 16)[:, 5].numpy(), expected, atol=1e-5)
    assert np.abs(_cubic_1d(profile, 16, 16 / 37) - expected).max() > 1e-2  # the offset matters
    assert torch.equal(resample_positions(pos, 37), pos)


def test_dinov2_extractor_from_a_meta_checkpoint(tmp_path):
    state = _meta_checkpoint("vits14")
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    ext = get_extractor("dinov2", weights=path, model="vits14", device="cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    feats = ext(images)
    assert feats.shape == (3, 384) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, ext(images))  # deterministic
    np.testing.assert_allclose(ext(images[:1]), feats[:1], rtol=1e-5, atol=1e-6)  # independent of the batch
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # images are told apart
    spec = ext.spec()
    assert spec["name"] == "dinov2" and spec["model"] == "vits14" and spec["dim"] == 384 and spec["input_size"] == 224
    assert spec["weights"] == path.name and len(spec["weights_sha256"]) == 64 and spec["protocol"] == "slct"

    # the same network by hand: PIL bicubic to 224, ImageNet normalisation, timm's model with resampled positions
    net = load_dinov2(path, "vits14")
    x = np.stack([np.asarray(PIL.Image.fromarray(im).resize((224, 224), PIL.Image.BICUBIC)) for im in images])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = net.forward_features(x)
    np.testing.assert_allclose(feats, tokens[:, 0].double().numpy(), rtol=1e-5, atol=1e-5)  # normed class token


def test_dinov2_reads_timm_safetensors_from_the_hub_cache(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _meta_checkpoint("vits14", seed=1).items() if k != "mask_token"}
    snapshot = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SLCT_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    ext = get_extractor("dinov2", model="vits14", device="cpu")
    assert ext.weights_path == snapshot / "model.safetensors"
    assert ext(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 384)


def test_missing_or_foreign_dinov2_weights_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SLCT_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth.*dl.fbaipublicfiles.com"):
        get_extractor("dinov2")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not have the DINOv2 vits14 layout"):
        get_extractor("dinov2", model="vits14", weights=tmp_path / "other.pth")
    with pytest.raises(ValueError, match="vitl14"):
        get_extractor("dinov2", model="vith16", weights=tmp_path / "other.pth")


def test_cli_fd_dinov2_reference_and_evaluation(tmp_path, capsys):
    from slct.cli import main

    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_meta_checkpoint("vits14"), path)
    rng = np.random.default_rng(5)
    real, fake = tmp_path / "real", tmp_path / "fake"
    for folder in (real, fake):
        folder.mkdir()
        for i in range(5):
            PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ref = tmp_path / "ref.npz"
    common = ["--weights", str(path), "--device", "cpu", "--no-progress"]
    assert main(["eval", "ref", str(real), "--extractor", "dinov2", "--model", "vits14", "--out", str(ref),
                 *common]) == 0
    manifest = json.loads(ref.with_suffix(".json").read_text())
    assert manifest["extractor"]["model"] == "vits14" and manifest["extractor"]["dim"] == 384
    out = tmp_path / "fd.json"
    assert main(["eval", "--images", str(fake), "--ref", str(ref), "--out", str(out), *common]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["label"] == "FD-DINOv2" and row["fd"] > 0
    assert main(["eval", "--images", str(fake), "--ref", str(ref), "--model", "vitb14", *common]) == 2
    assert "does not have the DINOv2 vitb14 layout" in capsys.readouterr().err
