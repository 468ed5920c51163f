"""Reliability round 2 (README "What slct guarantees"): one process per run directory, a damaged newest checkpoint
costs nothing but the steps since the one before, signals exit as a shell reports them, damaged or non-finite files
and arguments are refused in one line instead of producing garbage with exit code 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from slct import checkpoint
from slct.config import load_config
from slct.training import train

from test_reliability import TINY, cli, error_line, tiny_cfg  # noqa: E402  the shared helpers of the first round

TRAIN = ["train", "--preset", "slct", "--data-preset", "digits", "--batch", "8", "--device", "cpu",
         "--set", "network.name=unet-tiny", "--set", "logging.sample_every_steps=0",
         "--set", "logging.log_every_steps=1", "--set", "checkpoint.every_steps=4"]


def state_of(run_dir):
    ckpt = checkpoint.load(checkpoint.latest_checkpoint(run_dir))
    return ckpt["model"], ckpt["state"]["step"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------------------------------
# 4. one process per run directory


def test_a_second_process_is_refused_and_sigterm_exits_143(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    first = subprocess.Popen([sys.executable, "-m", "slct", *TRAIN, "--steps", "100000", "--out", str(run),
                              "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "checkpoint-00000004.pt").exists():  # started and stepping
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        code, _, err = cli(capsys, *TRAIN, "--steps", "100000", "--out", run)
        line = error_line(err)
        assert code == 2 and f"pid {first.pid} on {socket.gethostname()}" in line and "in use by another" in line
        rows = (run / "metrics.jsonl").read_text()
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143  # 128 + SIGTERM, as a shell reports a process a scheduler stopped
    assert "stopped (signal)" in out and "re-run the same command to resume" in out
    assert (run / "metrics.jsonl").read_text().startswith(rows)  # the refused start wrote nothing into the run
    assert (run / "lock").read_text() == ""  # released


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    pid = dead_pid()
    (run / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    code, out, err = cli(capsys, *TRAIN, "--steps", "2", "--out", run, "--no-progress")
    assert code == 0, err
    assert f"took over the run directory from pid {pid}" in err
    assert (run / "snapshot-00000002.pt").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# 5. a damaged or hostile newest checkpoint


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_bitwise(tmp_path, capsys):
    reference = tmp_path / "reference"
    train(tiny_cfg(12), reference, progress=False)
    run = tmp_path / "run"
    train(tiny_cfg(12), run, until_step=8, progress=False)  # checkpoints 0, 4, 8
    newest = run / "checkpoints" / "checkpoint-00000008.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # cut mid-transfer
    result = train(tiny_cfg(12), run, progress="lines")
    out, err = capsys.readouterr()
    assert result.finished
    warning = [line for line in err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "checkpoint-00000008.pt" in warning[0] and "resuming from checkpoint-00000004.pt" \
        in warning[0] and " ..." not in warning[0][-5:]
    assert (run / "checkpoints" / "checkpoint-00000008.pt.damaged").read_bytes() == data[: len(data) // 2]  # kept
    assert "resuming from" in out and "(step 4 of 12)" in out  # said under --no-progress too
    a, b = state_of(run)[0], state_of(reference)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hostile_newest_checkpoint_stops_with_how_to_continue(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(8), run, progress=False)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "x": Hostile()}, run / "checkpoints" / "checkpoint-00000012.pt")
    code, _, err = cli(capsys, *TRAIN, "--steps", "16", "--out", run)
    line = error_line(err)
    assert code == 2 and not marker.exists()
    assert "checkpoint-00000012.pt" in line and "To continue, delete it" in line
    assert "--resume " + str(run / "checkpoints" / "checkpoint-00000008.pt") in line


# ---------------------------------------------------------------------------------------------------------------------
# 3. garbage with exit code 0


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    sets = [*TINY, "train.total_steps=8", "train.batch_size=8", "checkpoint.every_steps=4",
            "train.ema_power_stds=[0.05,0.1]", "train.ema_power_every_steps=2"]
    train(load_config("slct", "digits", sets=sets), run, progress=False)
    return run


@pytest.mark.parametrize("value", ["-1", "nan", "1000", "0"])
def test_sample_refuses_a_sigma_mid_outside_the_grid(small_run, tmp_path, capsys, value):
    out = tmp_path / "s"
    code, _, err = cli(capsys, "sample", small_run, "--n", "2", "--nfe", "2", "--device", "cpu", "--out", out,
                       "--sigma-mid", value)
    line = error_line(err)
    assert code == 2 and "--sigma-mid must be a noise level in (0.002, 80)" in line
    assert not out.exists()


def test_bit_rot_in_a_snapshot_is_refused_not_sampled_as_black_images(small_run, tmp_path, capsys):
    snap = sorted(small_run.glob("snapshot-*.pt"))[-1]
    payload = checkpoint.load(snap, expect=checkpoint.SNAPSHOT_FORMAT)
    name = payload["ema_default"]
    key = next(k for k, v in payload["ema"][name].items() if v.numel() > 1024)
    view = payload["ema"][name][key].view(-1)
    view[:1024] = torch.frombuffer(bytearray(b"\xff" * 4096), dtype=torch.float32)  # 4 KB of 0xff bytes: NaNs
    rotten = tmp_path / "snapshot-rotten.pt"
    torch.save(payload, rotten)
    out = tmp_path / "s"
    code, _, err = cli(capsys, "sample", rotten, "--n", "2", "--nfe", "1", "--device", "cpu", "--out", out)
    line = error_line(err)
    assert code == 2 and "non-finite values (1024 of" in line and key in line and "damaged" in line
    assert not out.exists()


def test_non_finite_samples_are_an_error_not_a_file(small_run, tmp_path):
    from slct.sampling import load_snapshot

    snap = load_snapshot(small_run, device="cpu")
    forward = snap.model.forward
    snap.model.forward = lambda x, *a, **k: forward(x, *a, **k) * float("nan")
    with pytest.raises(ValueError, match=r"2 of 2 samples at 1 NFE are not finite \(first: seed 5\)"):
        snap.sample_latents([5, 6], 1)


def test_ema_refuses_a_step_past_the_stored_ones_and_a_poor_fit(small_run, capsys):
    code, _, err = cli(capsys, "ema", small_run, "--std", "0.08", "--step", "100")
    assert code == 2 and "--step 100 is past the newest stored power EMA (step 8)" in error_line(err)
    # at step 3 only step 2's EMAs exist: no combination of them is the EMA at step 3
    code, _, err = cli(capsys, "ema", small_run, "--std", "0.08", "--step", "3")
    line = error_line(err)
    assert code == 2 and "cannot make std=0.08 at step 3: the profile fit error is" in line
    assert "(at most 10% accepted)" in line
    assert not (small_run / "posthoc-ema").exists()
    code, out, _ = cli(capsys, "ema", small_run, "--std", "0.08")
    assert code == 0 and "std=0.08 at step 8" in out


# ---------------------------------------------------------------------------------------------------------------------
# 1. a reference of another resolution


def test_eval_refuses_a_reference_of_another_image_size(small_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    for flags, name in (([], "native"), (["--resolution", "4"], "r4"), (["--resolution", "8"], "r8")):
        code, _, err = cli(capsys, "eval", "ref", folder, "--extractor", "pixels", "--out", tmp_path / f"{name}.npz",
                           "--no-progress", *flags)
        assert code == 0, err
    assert json.loads((tmp_path / "native.json").read_text())["image_size"] == [16, 16]
    evaluate = ["eval", "--snapshot", small_run, "--n", "4", "--nfe", "1", "--device", "cpu", "--no-progress"]
    for name, size in (("native", "16x16"), ("r4", "4x4")):
        code, _, err = cli(capsys, *evaluate, "--ref", tmp_path / f"{name}.npz")
        line = error_line(err)
        assert code == 2 and f"statistics of {size} px images" in line and "makes 8x8 px images" in line
        assert f"slct eval ref {folder} --resolution 8 --extractor pixels" in line
    code, out, err = cli(capsys, *evaluate, "--ref", tmp_path / "r8.npz")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------------------------
# 6. a full disk in export and sample: one line naming the path, nothing left behind


def _full_disk_after(calls: int):
    import errno

    count = {"n": 0}

    def fail(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    from PIL import Image

    original = Image.Image.save
    return fail


def test_sample_on_a_full_disk_leaves_nothing_and_says_where(small_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    out = tmp_path / "samples"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    monkeypatch.setattr(Image.Image, "save", _full_disk_after(5))
    code, _, err = cli(capsys, "sample", small_run, "--n", "8", "--nfe", "1", "--device", "cpu", "--out", out,
                       "--format", "png", "grid", "--batch", "4")
    line = error_line(err)
    assert code == 2 and "no space left on" in line and f"while writing samples to {out}; nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging folder
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    code, _, err = cli(capsys, "sample", small_run, "--n", "8", "--nfe", "1", "--device", "cpu", "--out", out,
                       "--format", "png", "grid")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["grid-nfe1.png", "keep.txt", "nfe1", "samples.json"]
    assert len(list((out / "nfe1").iterdir())) == 8


def test_export_on_a_full_disk_leaves_nothing_and_the_retry_works(small_run, tmp_path, capsys, monkeypatch):
    import errno

    pytest.importorskip("diffusers")
    from slct import diffusers_pipeline

    real = diffusers_pipeline.SLCTPipeline.save_pretrained

    def full(self, folder, **kwargs):
        real(self, folder, **kwargs)  # most of the files written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diffusers_pipeline.SLCTPipeline, "save_pretrained", full)
    out = tmp_path / "pipe"
    code, _, err = cli(capsys, "export", small_run, out)
    line = error_line(err)
    assert code == 2 and f"while writing the diffusers pipeline to {out}; nothing was written" in line
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder
    monkeypatch.undo()
    code, _, err = cli(capsys, "export", small_run, out)
    assert code == 0, err
    weights = list(out.rglob("*.safetensors"))
    assert weights and all((w.stat().st_mode & 0o777) == 0o666 & ~_umask() for w in weights)  # not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# 2. encode reads linked folders and lists every entry it could not read


def test_encode_follows_linked_folders_and_lists_what_it_cannot_read(tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(path, mode="RGB"):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).convert(mode).save(path)

    elsewhere = tmp_path / "elsewhere" / "cats"
    elsewhere.mkdir(parents=True)
    for i in range(3):
        image(elsewhere / f"cat{i}.png")
    root = tmp_path / "data"
    (root / "dogs").mkdir(parents=True)
    for i in range(2):
        image(root / "dogs" / f"dog{i}.png")
    image(root / "cmyk.jpg", "CMYK")
    image(root / "palette.png", "P")
    (root / "cats").symlink_to(elsewhere, target_is_directory=True)  # a class assembled from a link
    (root / "dogs" / "loop").symlink_to(root, target_is_directory=True)  # a link back up
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(root / "pipe.jpg")  # would block a reader forever
    (root / "locked").mkdir()
    image(root / "locked" / "hidden.png")
    real_scandir = os.scandir

    def scandir(path):  # root ignores permissions: an unreadable directory as a non-root user sees it
        if os.path.basename(str(path)) == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = cli(capsys, "encode", root, "--out", tmp_path / "latents", "--codec", "identity",
                         "--resolution", "8", "--workers", "0", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["count"] == 3 + 2 + 2  # the linked cats, the dogs, the CMYK and palette images
    skipped = {(s["name"], s["reason"]) for s in manifest["skipped"]}
    assert skipped == {("dogs/loop", "symlink-loop"), ("gone.png", "broken-link"), ("pipe.jpg", "not-a-file"),
                       ("locked", "unreadable-directory")}
    assert "a FIFO, not a regular file" in {s["detail"] for s in manifest["skipped"]}
    converted = {(c["name"], c["reason"]) for c in manifest["converted"]}
    assert {("cmyk.jpg", "cmyk"), ("palette.png", "palette")} <= converted
    assert "skipped images: 4 (" in out and "unreadable-directory 1" in out and "symlink-loop 1" in out
    assert "encode identity 8px: 7/7 images (100%)" in out  # plain progress lines under --no-progress
    code, _, err = cli(capsys, "encode", root, "--out", tmp_path / "strict", "--codec", "identity",
                       "--resolution", "8", "--workers", "0", "--strict")
    line = error_line(err)
    assert code == 2 and "cannot read 'dogs/loop'" in line and "(4 such entries; without --strict" in line


# ---------------------------------------------------------------------------------------------------------------------
# 7. smaller ones


def test_a_manifest_without_codec_is_one_line(small_run, tmp_path, capsys):
    from slct.data import LatentDataset

    data = tmp_path / "latents"
    source = LatentDataset("builtin:digits8").path
    data.mkdir()
    for f in source.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["codec"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, *TRAIN, "--data", data, "--steps", "2", "--out", tmp_path / "run")
    line = error_line(err)
    assert code == 2 and "lacks 'codec'" in line and "encode the images again" in line


@pytest.mark.parametrize("value, message", [("-0.001", "optim.lr must be a finite number > 0"),
                                            ("0", "optim.lr must be a finite number > 0"),
                                            (".nan", "optim.lr must be a finite number > 0")])
def test_a_learning_rate_that_cannot_train_is_refused(tmp_path, capsys, value, message):
    code, _, err = cli(capsys, *TRAIN, "--steps", "2", "--set", f"optim.lr={value}", "--out", tmp_path / "run")
    assert code == 2 and message in error_line(err) and not (tmp_path / "run").exists()


def test_the_16px_builtin_digits_train_with_the_digits_preset(tmp_path, capsys):
    code, _, err = cli(capsys, *TRAIN, "--data", "builtin:digits", "--steps", "2", "--out", tmp_path / "run",
                       "--no-progress")
    assert code == 0, err


def test_sampling_a_run_whose_checkpoint_is_newer_than_its_snapshot_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tiny_cfg(8, "checkpoint.every_steps=2")
    train(cfg, run, until_step=4, progress=False)  # a snapshot at the stop, step 4

    def crash(step, loss):
        if step == 6:
            raise RuntimeError("the machine went away")  # after checkpoint 6, before any snapshot
        return loss

    with pytest.raises(RuntimeError, match="went away"):
        train(cfg, run, progress=False, loss_hook=crash)
    code, _, err = cli(capsys, "sample", run, "--n", "2", "--nfe", "1", "--device", "cpu", "--out", tmp_path / "s")
    assert code == 0
    assert "newest snapshot is from step 4, its newest checkpoint from step 6" in err


def test_eval_on_a_cpu_says_that_50k_samples_take_long(small_run, tmp_path, capsys):
    from slct.eval import get_extractor
    from slct.eval.reference import reference_from_images, save_reference

    ref = save_reference(reference_from_images(torch.zeros(4, 1, 4, 4), get_extractor("pixels", size=4)),
                         tmp_path / "r.npz")  # 4x4 images: refused after the notice, before any sampling
    code, _, err = cli(capsys, "eval", "--snapshot", small_run, "--ref", ref, "--device", "cpu")
    assert code == 2 and "note: 50,000 samples per NFE on the CPU take long" in err
    assert "statistics of 4x4 px images" in error_line(err)


def test_the_td_progress_counts_samples(capsys):
    from slct.analyze import build_td_model, temporal_differences

    model, _ = build_td_model("unet-tiny", None, (1, 8, 8))
    temporal_differences(model, torch.zeros(6, 1, 8, 8), 11, torch.Generator().manual_seed(0), batch_size=4,
                         progress=True)
    err = capsys.readouterr().err
    assert " 6/6 " in err and "sample/s" in err
