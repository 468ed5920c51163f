"""Evaluation protocols: slct's (PIL bicubic on uint8) and pytorch-fid's (bilinear in float inside the
network), checked against pytorch-fid itself with a shared random state dict (no download)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from slct.compat import import_module
from slct.eval import get_extractor
from slct.eval.evaluate import check_compatible, evaluate_folder
from slct.eval.inception import FID_WEIGHTS_FILE, FIDInceptionV3
from slct.eval.reference import compute_reference, load_reference, reference_from_images, save_reference


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """pytorch-fid's weight layout with random values, BatchNorm statistics included (so no layer is trivial)."""
    torch.manual_seed(1)
    model = FIDInceptionV3()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            value = torch.rand_like(value) + 0.5
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            value = torch.randn_like(value) * 0.1
        state[key] = value
    path = tmp_path_factory.mktemp("inception") / FID_WEIGHTS_FILE
    torch.save(state, path)
    return path, state


def _pytorch_fid_model(state, monkeypatch):
    """pytorch-fid's own InceptionV3 (pool3, resize_input and normalize_input on) with ``state`` loaded."""
    fid_inception = import_module("pytorch_fid.inception")
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: dict(state))
    block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
    return fid_inception.InceptionV3([block], resize_input=True, normalize_input=True,
                                     use_fid_inception=True).eval()


def test_pytorch_fid_protocol_gives_pytorch_fids_features(random_inception, monkeypatch):
    path, state = random_inception
    theirs = _pytorch_fid_model(state, monkeypatch)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)  # 64 px: both protocols have to resize to 299
    with torch.no_grad():
        expected = theirs(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)[0].squeeze(-1).squeeze(-1)
    ours = get_extractor("inception", weights=path, device="cpu", protocol="pytorch-fid")
    got = ours(u8)
    np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-5, atol=1e-6)
    # at 299 px no resize happens in either; the slct protocol's network is pytorch-fid's network, bit for bit
    u8_299 = rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(u8_299).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    slct = get_extractor("inception", weights=path, device="cpu")
    np.testing.assert_allclose(slct(u8_299), expected.double().numpy(), rtol=1e-5, atol=1e-6)


def test_pytorch_fid_protocol_reads_files_as_pytorch_fid_does(random_inception, monkeypatch, tmp_path):
    path, state = random_inception
    theirs = _pytorch_fid_model(state, monkeypatch)
    fid_score = import_module("pytorch_fid.fid_score")
    rng = np.random.default_rng(1)
    folder = tmp_path / "generated"
    folder.mkdir()
    for i in range(3):  # an RGB PNG, a grey PNG and a 16-bit grey PNG: pytorch-fid's convert("RGB") decides
        im = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        PIL.Image.fromarray(im if i == 0 else im[..., 0]).save(folder / f"{i}.png")
    PIL.Image.fromarray((rng.integers(0, 65536, (48, 48))).astype(np.uint16)).save(folder / "3.png")
    files = sorted(folder.glob("*.png"))
    expected = fid_score.get_activations(files, theirs, batch_size=1, dims=2048, device="cpu", num_workers=0)
    ext = get_extractor("inception", weights=path, device="cpu", protocol="pytorch-fid")
    from slct.eval.reference import image_reader

    count, read = image_reader(folder, loader="pytorch-fid")
    np.testing.assert_allclose(ext(read(range(count))), expected, rtol=1e-5, atol=1e-6)


def test_the_two_protocols_differ_and_are_never_compared(random_inception, tmp_path):
    path, _ = random_inception
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    slct = get_extractor("inception", weights=path, device="cpu")
    pfid = get_extractor("inception", weights=path, device="cpu", protocol="pytorch-fid")
    # what the network sees (random Inception weights barely tell images apart, so compare its inputs)
    a = get_extractor("pixels", size=299)(u8)
    b = get_extractor("pixels", size=299, protocol="pytorch-fid")(u8)
    assert 0.005 < np.abs(a - b).mean() < 0.05  # bicubic on uint8 vs bilinear in float: close, not the same
    assert slct.spec()["protocol"] == "slct" and pfid.spec()["protocol"] == "pytorch-fid"
    assert slct.spec()["resize"] == "pil-bicubic" and pfid.spec()["resize"] == "torch-bilinear-float"

    ref = reference_from_images(u8, pfid)
    assert ref.manifest["protocol"] == "pytorch-fid" and "bilinear" in ref.manifest["resize"]
    saved = load_reference(save_reference(ref, tmp_path / "ref.npz"))
    assert json.loads((tmp_path / "ref.json").read_text())["extractor"]["protocol"] == "pytorch-fid"
    check_compatible(pfid, saved)
    with pytest.raises(ValueError, match="protocol 'pytorch-fid'.*--protocol pytorch-fid"):
        check_compatible(slct, saved)
    old = load_reference(save_reference(reference_from_images(u8, slct), tmp_path / "old.npz"))
    del old.manifest["extractor"]["protocol"]  # a reference written before protocols were recorded: slct's
    check_compatible(slct, old)
    with pytest.raises(ValueError, match="protocol 'slct'"):
        check_compatible(pfid, old)


def test_protocols_need_a_torch_network_and_rgb():
    with pytest.raises(ValueError, match="supports the protocols \\['slct'\\], not 'pytorch-fid'"):
        get_extractor("mobilenetv2", protocol="pytorch-fid")
    with pytest.raises(ValueError, match="protocol must be one of"):
        get_extractor("pixels", protocol="clean-fid")
    with pytest.raises(ValueError, match="RGB"):
        get_extractor("pixels", channels=1, protocol="pytorch-fid")
    assert get_extractor("pixels", protocol="slct").protocol == "slct"


def test_cli_records_the_protocol_and_refuses_a_mismatch(tmp_path, capsys):
    from slct.cli import main

    rng = np.random.default_rng(3)
    real, fake = tmp_path / "real", tmp_path / "fake"
    for folder in (real, fake):
        folder.mkdir()
        for i in range(6):
            PIL.Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref", str(real), "--extractor", "pixels", "--protocol", "pytorch-fid", "--out", str(ref),
                 "--no-progress"]) == 0
    assert json.loads(ref.with_suffix(".json").read_text())["protocol"] == "pytorch-fid"
    out = tmp_path / "result.json"
    assert main(["eval", "--images", str(fake), "--ref", str(ref), "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["results"][0]["protocol"] == "pytorch-fid" and record["extractors"][0]["protocol"] == "pytorch-fid"
    assert "pytorch-fid" in capsys.readouterr().out  # the table's protocol column
    assert main(["eval", "--images", str(fake), "--ref", str(ref), "--protocol", "slct", "--no-progress"]) == 2
    assert "not comparable" in capsys.readouterr().err
    direct = evaluate_folder(fake, get_extractor("pixels", protocol="pytorch-fid"), load_reference(ref),
                             progress=False)
    assert direct["fd"] == pytest.approx(record["results"][0]["fd"])


def test_reference_files_use_the_protocols_loader(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "grey16"
    folder.mkdir()
    for i in range(3):  # 16-bit grey: slct scales to 8 bits, PIL's convert("RGB") (pytorch-fid) saturates
        PIL.Image.fromarray(rng.integers(0, 65536, (16, 16)).astype(np.uint16)).save(folder / f"{i}.png")
    slct = compute_reference(folder, get_extractor("pixels", size=16), progress=False)
    pfid = compute_reference(folder, get_extractor("pixels", size=16, protocol="pytorch-fid"), progress=False)
    assert 0.3 < slct.mu.mean() < 0.7  # 16-bit values scaled to 8 bits
    assert pfid.mu.mean() > 0.95  # saturated at 255, as pytorch-fid would read them
