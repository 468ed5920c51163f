"""Feature extractors: the resize policy, the registry, weight lookup and the networks' key layouts."""

from __future__ import annotations

import io
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from slct.eval import get_extractor, prepare_images, to_uint8
from slct.eval.extractors import EXTRACTORS, find_weights
from slct.eval.inception import FID_WEIGHTS_FILE, FID_WEIGHTS_URL, FIDInceptionV3, load_fid_inception
from slct.eval.vgg import VGG16, load_vgg16

# a few keys of pytorch-fid's pt_inception-2015-12-05-6726825d.pth with their published shapes
PUBLISHED_INCEPTION_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _no_weights_anywhere(monkeypatch, tmp_path):
    """Point every weight location at empty folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SLCT_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------- resize policy


def test_float_images_map_to_uint8_by_round_and_clamp():
    v = torch.arange(256, dtype=torch.float64)
    x = (v / 127.5 - 1).float().view(1, 1, 16, 16)  # every uint8 level once, as a [-1, 1] image
    np.testing.assert_array_equal(to_uint8(x)[0, ..., 0], v.view(16, 16).numpy().astype(np.uint8))
    out_of_range = torch.tensor([-3.0, -1.0, 1.0, 2.0]).view(1, 1, 2, 2)
    np.testing.assert_array_equal(to_uint8(out_of_range).ravel(), [0, 0, 255, 255])


def test_resize_is_pil_bicubic_from_uint8_and_equal_for_float_and_uint8_inputs():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    expected = np.stack([np.asarray(PIL.Image.fromarray(im).resize((7, 7), PIL.Image.BICUBIC)) for im in u8])
    np.testing.assert_array_equal(prepare_images(u8, 7), expected)
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 127.5 - 1  # what a codec decodes to
    np.testing.assert_array_equal(prepare_images(as_float, 7), expected)


def test_grey_images_are_repeated_to_rgb():
    grey = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(prepare_images(grey, 8, channels=3), np.repeat(grey, 3, axis=3))
    pixels = get_extractor("pixels", size=8)
    np.testing.assert_array_equal(pixels(grey), pixels(np.repeat(grey, 3, axis=3)))


def test_images_of_other_layouts_are_rejected():
    with pytest.raises(ValueError, match="NCHW"):
        to_uint8(torch.zeros(2, 5, 8, 8))
    with pytest.raises(ValueError, match="4-d"):
        to_uint8(np.zeros((8, 8, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- registry


def test_pixels_extractor_features_and_spec():
    ext = get_extractor("pixels", size=4, channels=1)
    images = torch.full((5, 1, 4, 4), 1.0)
    feats = ext(images)
    assert feats.dtype == np.float64 and feats.shape == (5, 16) and ext.dim == 16
    np.testing.assert_array_equal(feats, 1.0)
    assert ext.spec() == dict(name="pixels", dim=16, input_size=4, channels=1, resize="pil-bicubic", protocol="slct")


def test_get_extractor_rejects_unknown_names_and_options():
    assert set(EXTRACTORS) == {"inception", "dinov2", "vgg16", "mobilenetv2", "pixels"}
    with pytest.raises(ValueError, match="extractor must be one of"):
        get_extractor("clip")
    with pytest.raises(ValueError, match="does not take \\['weights'\\]"):
        get_extractor("pixels", weights="x.pth")


# ---------------------------------------------------------------------------------------------- inception


def test_inception_has_the_published_key_layout_and_loads_it(tmp_path):
    model = FIDInceptionV3()
    state = model.state_dict()
    for key, shape in PUBLISHED_INCEPTION_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision's, minus aux, with 1008 classes

    path = tmp_path / FID_WEIGHTS_FILE
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    ext = get_extractor("inception", weights=path, device="cpu")
    for key in PUBLISHED_INCEPTION_KEYS:
        torch.testing.assert_close(ext.model.state_dict()[key], state[key])
    feats = ext(torch.rand(1, 3, 32, 32) * 2 - 1)  # resized to 299 by the policy
    assert feats.shape == (1, 2048) and np.isfinite(feats).all() and (feats >= 0).all()  # pool of ReLUs
    assert ext.spec()["weights"] == FID_WEIGHTS_FILE and len(ext.spec()["weights_sha256"]) == 64

    bad = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing \\['fc.bias', 'fc.weight'\\]"):
        load_fid_inception(tmp_path / "bad.pth")


def test_missing_inception_weights_name_the_file_url_and_place(monkeypatch, tmp_path):
    _no_weights_anywhere(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        get_extractor("inception")
    msg = str(info.value)
    assert FID_WEIGHTS_FILE in msg and FID_WEIGHTS_URL in msg and "--download" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / FID_WEIGHTS_FILE) in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        get_extractor("inception", weights=tmp_path / "nowhere.pth")


def test_weights_are_found_in_slct_weights(monkeypatch, tmp_path):
    _no_weights_anywhere(monkeypatch, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "b.pt").write_bytes(b"x")
    found = find_weights(None, filenames=["a.pt", "b.pt"], url="https://example.invalid/a.pt", what="test")
    assert found == tmp_path / "empty" / "b.pt"


# ---------------------------------------------------------------------------------------------- vgg16


def test_vgg16_has_the_torchvision_key_layout():
    with torch.device("meta"):  # shapes only: no 528 MB of random weights
        state = VGG16().state_dict()
    expected = {"features.0.weight": (64, 3, 3, 3), "features.28.weight": (512, 512, 3, 3),
                "features.28.bias": (512,), "classifier.0.weight": (4096, 25088),
                "classifier.3.weight": (4096, 4096), "classifier.6.weight": (1000, 4096)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 2 * (13 + 3)  # 13 convolutions and 3 linear layers, weight and bias each


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save: how NVlabs' file was made
def test_vgg16_reads_a_torchscript_detector_and_rejects_other_files(tmp_path):
    class Detector(torch.nn.Module):  # stands in for NVlabs' vgg16.pt: forward(x, return_features=...)
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 1366)[:, :4096]

    torch.jit.save(torch.jit.script(Detector()), tmp_path / "vgg16.pt")
    fn, fmt = load_vgg16(tmp_path / "vgg16.pt")
    assert fmt == "nvlabs-torchscript"
    assert fn(torch.full((2, 3, 224, 224), 255.0)).shape == (2, 4096)
    ext = get_extractor("vgg16", weights=tmp_path / "vgg16.pt", device="cpu")
    feats = ext(np.full((1, 10, 10, 3), 255, np.uint8))
    np.testing.assert_allclose(feats, 255.0)  # the detector saw RGB in [0, 255]
    assert ext.spec()["weights_format"] == "nvlabs-torchscript"

    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither"):
        load_vgg16(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------- mobilenetv2


def test_mobilenetv2_features_of_a_utkface_image(shared_weights, utkface_zip):
    with zipfile.ZipFile(utkface_zip) as z:
        name = next(n for n in sorted(z.namelist()) if n.endswith(".jpg"))
        image = np.asarray(PIL.Image.open(io.BytesIO(z.read(name))).convert("RGB"))
    ext = get_extractor("mobilenetv2", weights=shared_weights / "mobilenet_v2_1.0_224_quant.tflite")
    first = ext(image[None])
    assert first.shape == (1, 1280) and first.dtype == np.float64 and ext.dim == 1280
    assert np.isfinite(first).all() and (first >= 0).all() and first.max() > 0  # an average pool of ReLU6s
    np.testing.assert_array_equal(ext(image[None]), first)
    assert ext.spec()["weights_sha256"] == "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"


def test_mobilenetv2_without_litert_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    (tmp_path / "m.tflite").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r'pip install "slct\[eval\]"'):
        get_extractor("mobilenetv2", weights=tmp_path / "m.tflite")
