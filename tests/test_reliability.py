"""What slct guarantees (README "What slct guarantees"): loading a file never runs code from it, a run whose steps stay
non-finite ends by itself with only finite checkpoints, a failed save says why in one line and leaves no temporary
file, and the errors people meet first are one clear line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

from slct import checkpoint
from slct.cli import main
from slct.config import load_config
from slct.training import TrainingDiverged, train
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "logging.log_every_steps=1", "train.device=cpu"]
TRAIN = ["train", "--preset", "slct", "--data-preset", "digits", "--batch", "8", "--device", "cpu",
         "--set", "logging.sample_every_steps=0", "--set", "logging.log_every_steps=1"]


def tiny_cfg(steps=8, *extra):
    return load_config("slct", "digits", sets=[*TINY, f"train.total_steps={steps}", "train.batch_size=8",
                                               "checkpoint.every_steps=4", *extra])


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The error of a failed command: exactly one line on stderr (progress bars aside)."""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Hostile files: nothing in them runs


class Hostile:
    """Unpickling this runs a shell command (what a malicious shared snapshot would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    path = tmp_path / "hostile.pt"
    torch.save({"format": checkpoint.SNAPSHOT_FORMAT, "ema": {"0.9": Hostile(marker)}}, path)
    # the payload is real: an unrestricted torch.load runs it
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"], check=True)
    assert marker.exists()
    marker.unlink()
    return path, marker


@pytest.fixture(scope="module")
def pixel_reference(tmp_path_factory):
    from slct.eval import get_extractor
    from slct.eval.reference import compute_reference, save_reference

    ref = compute_reference("builtin:digits8", get_extractor("pixels"), progress=False, limit=64)
    return save_reference(ref, tmp_path_factory.mktemp("ref") / "digits8-pixels.npz")


def test_hostile_files_are_refused_on_every_load_path(hostile, pixel_reference, tmp_path, capsys):
    from slct.data.builtin import builtin_dataset_dir

    path, marker = hostile
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "checkpoints" / "checkpoint-00000010.pt")  # auto-resume picks the newest
    calls = {
        "sample": ["sample", path, "--n", 2, "--device", "cpu"],
        "eval": ["eval", "--snapshot", path, "--ref", pixel_reference, "--n", 4, "--device", "cpu", "--no-progress"],
        "analyze": ["analyze", builtin_dataset_dir("digits8"), "--checkpoint", path, "--limit", 32,
                    "--out", tmp_path / "analysis", "--no-progress"],
        "train --resume": [*TRAIN, "--steps", 2, "--resume", path, "--out", tmp_path / "other"],
        "train (auto-resume)": [*TRAIN, "--steps", 2, "--out", run],
    }
    for name, argv in calls.items():
        code, _, err = cli(capsys, *argv)
        assert code == 2, name
        line = error_line(err)
        assert "nothing in it was run" in line and "posix.system" in line, (name, line)
        assert not marker.exists(), name


def test_files_slct_writes_load_without_unpickling(tmp_path):
    train(tiny_cfg(4), tmp_path, progress=False)
    for path in [*checkpoint.list_checkpoints(tmp_path), *tmp_path.glob("snapshot-*.pt")]:
        payload = torch.load(path, weights_only=True)  # tensors and plain containers only
        assert payload["format"] in (checkpoint.CHECKPOINT_FORMAT, checkpoint.SNAPSHOT_FORMAT)
    with pytest.raises(ValueError, match="is not an slct snapshot .*it is a training checkpoint"):
        checkpoint.load(checkpoint.latest_checkpoint(tmp_path), expect=checkpoint.SNAPSHOT_FORMAT)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Non-finite runs end


def _all_finite(payload) -> bool:
    if isinstance(payload, torch.Tensor):
        return not payload.is_floating_point() or bool(torch.isfinite(payload).all())
    if isinstance(payload, dict):
        return all(_all_finite(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return all(_all_finite(v) for v in payload)
    return True


def test_a_diverging_run_stops_by_itself_in_one_line_with_only_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, *TRAIN, "--steps", 200, "--out", out, "--set", "optim.lr=1e30",
                       "--set", "checkpoint.every_steps=2", "--no-progress")
    assert code == 2
    line = error_line(err)
    assert line.startswith("slct train: error: training diverged: 5 consecutive non-finite steps up to step ")
    assert "after 3 rollback(s) (last finite loss" in line and "optim.lr" in line and len(line) < 600
    for path in checkpoint.list_checkpoints(out):
        ckpt = torch.load(path, weights_only=True)
        assert _all_finite(ckpt["model"]) and _all_finite(ckpt["optimizer"]) and _all_finite(ckpt["ema"]), path.name
    rows = [json.loads(r) for r in open(out / "metrics.jsonl")]
    events = [r["event"] for r in rows if "event" in r]
    assert sum("restored" in e for e in events) == 3 and events[-1].startswith("training diverged")
    steps = [r for r in rows if "step" in r]
    assert max(r["step"] for r in steps) < 200 and all(r["images_per_s"] > 0 for r in steps)  # ended, no negative rates


def test_no_checkpoint_is_written_inside_a_streak_of_nonfinite_steps(tmp_path):
    def hook(step, loss):  # steps 3, 4, 5 (0-based) are non-finite; the periodic checkpoint at step 4 falls inside
        return loss * float("nan") if step in (3, 4, 5) else loss

    cfg = tiny_cfg(8, "train.max_bad_steps=10", "checkpoint.keep=10")
    result = train(cfg, tmp_path, progress=False, loss_hook=hook)
    assert result.finished and result.state.bad_steps == 3
    # due at 4, postponed to the first good step after the streak (7), then 8 as usual
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "checkpoint-00000000.pt", "checkpoint-00000007.pt", "checkpoint-00000008.pt"]


def test_diverging_library_call_raises_and_rollbacks_are_capped(tmp_path):
    cfg = tiny_cfg(50, "optim.lr=1e30", "train.max_rollbacks=1", "train.max_bad_steps=2")
    with pytest.raises(TrainingDiverged, match="after 1 rollback"):
        train(cfg, tmp_path, progress=False)


def test_progress_bar_rewinds_on_rollback(tmp_path):
    from slct.training import Monitor, TrainState

    cfg = tiny_cfg(10)
    logger = Monitor(tmp_path, cfg, None, True, "bar", start=0, total=10)
    try:
        for _ in range(7):
            logger.bar.update(1)
        logger.rewind(TrainState(step=4, nimg=32))
        assert logger.bar.n == 4
    finally:
        logger.close()


# ---------------------------------------------------------------------------------------------------------------------
# 3. A full disk


def test_failed_save_removes_its_temporary_file_and_says_why(tmp_path, monkeypatch):
    target = tmp_path / "file.pt"

    def half_then_fail(obj, f):
        f.write(b"x" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    monkeypatch.setattr(checkpoint, "_LOW_SPACE_BYTES", 1 << 62)  # as if the disk were full
    with pytest.raises(checkpoint.SaveError, match=f"no space left on {tmp_path} while writing checkpoint 3$"):
        checkpoint.save_atomic({}, target, what="checkpoint 3")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path, capsys):
    train(tiny_cfg(4), tmp_path, until_step=2, progress=False)
    stale = [tmp_path / "checkpoints" / ".checkpoint-00000004.pt.tmp-4242", tmp_path / ".snapshot-00000004.pt.tmp-7"]
    for p in stale:
        p.write_bytes(b"partial")
    assert train(tiny_cfg(4), tmp_path, progress=False).finished
    assert not any(p.exists() for p in stale)
    assert "left by an interrupted write" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 MiB tmpfs (needs root and mount permission; skipped where the kernel refuses)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_file(small_disk, capsys):
    run = small_disk / "run"
    # a step-0 checkpoint of unet-tiny with one EMA is ~8 MB: it fits on 12 MiB, the step-4 one does not
    code, _, err = cli(capsys, *TRAIN, "--steps", 8, "--out", run, "--set", "checkpoint.every_steps=4",
                       "--set", "train.ema_decays=[]", "--no-progress")
    assert code == 2
    line = error_line(err)
    assert line == (f"slct train: error: no space left on {run / 'checkpoints'} while writing checkpoint 4; the newest "
                    "good checkpoint is checkpoint-00000000.pt (free some space, then re-run the same command to "
                    "resume from it)")
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert leftovers == ["checkpoint-00000000.pt"]
    assert shutil.disk_usage(small_disk).free > 1 << 20  # the partial file is gone: the space is free again


# ---------------------------------------------------------------------------------------------------------------------
# 5. One clear line


def _array_dataset(path, seed, n=64):
    from slct.data import encode_dataset
    from slct.data.sources import ArraySource

    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    encode_dataset(ArraySource(images), path, {"name": "identity", "channels": 1}, 8, num_workers=0, progress=False)
    return path


def test_resuming_on_data_with_other_statistics_is_one_short_line(tmp_path, capsys):
    a, b = _array_dataset(tmp_path / "a", 0), _array_dataset(tmp_path / "b", 1)
    base = [*TRAIN, "--steps", 4, "--out", tmp_path / "run", "--no-progress"]
    assert cli(capsys, *base, "--data", a, "--until-step", 2)[0] == 0
    code, _, err = cli(capsys, *base, "--data", b)
    line = error_line(err)
    assert code == 2 and len(line) < 400, len(line)
    assert "the data's normalisation differs from the checkpoint's" in line and "values differ" in line


def test_first_errors_people_meet_are_one_clear_line(tmp_path, capsys):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not utf-8 \xff")
    code, _, err = cli(capsys, *TRAIN, "--data", photo, "--out", tmp_path / "r1")
    assert code == 2 and "photo.jpg is a file, not a latent dataset directory" in error_line(err)

    code, _, err = cli(capsys, "eval", "--snapshot", "x.pt", "--bogus", "3")  # was "argument {ref}: invalid choice"
    assert code == 2 and "unrecognized arguments: --bogus 3" in error_line(err)

    code, _, err = cli(capsys, *TRAIN, "--batch", 5000, "--out", tmp_path / "r2")
    assert code == 2 and "train.batch_size (5000) is larger than the dataset (1797 latents" in error_line(err)
    assert not (tmp_path / "r2").exists()  # a failed start leaves no run folder

    code, _, err = cli(capsys, *TRAIN, "--set", "network.options={channel_mult: [1, 1, 1, 1, 1]}", "--out",
                       tmp_path / "r3", "--steps", 2)  # 5 levels need a side divisible by 16
    line = error_line(err)
    assert code == 2 and "does not fit latents of shape (1, 8, 8)" in line and "--set network.options." in line
    assert not (tmp_path / "r3").exists()


def test_a_start_that_fails_after_creating_the_run_folder_removes_it(tmp_path, monkeypatch):
    from slct.training import rundir

    def fail(*args, **kwargs):
        raise checkpoint.SaveError("no space left on X while writing checkpoint 0", disk_full=True)

    monkeypatch.setattr(rundir, "save_checkpoint", fail)
    with pytest.raises(checkpoint.SaveError):
        train(tiny_cfg(4), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_attention_follows_the_latent_size(tmp_path):
    from slct.model import build_model

    cfg = load_config("slct", "digits", sets=["network.name=unet-small"])  # attends at 4x4 on 8x8 latents
    cfg.network.options = {}
    model = build_model(cfg, (3, 16, 16))
    attn = [name for name, _ in model.named_modules() if name.endswith(".attn") or "attn" in name.split(".")[-1]]
    assert attn  # attention kept, now at the 8x8 level of the 16x16 UNet
    from slct.model import network_kwargs

    assert network_kwargs(cfg, (3, 16, 16), 0)["attn_resolutions"] == (8,)


def test_running_the_demo_again_continues_its_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(capsys, "demo", "--steps", 4, "--out", out, "--n-eval", 20)[0] == 0
    code, stdout, _ = cli(capsys, "demo", "--out", out, "--n-eval", 20)  # no --steps: no new calibration, no mismatch
    assert code == 0 and "continuing the 4-step run" in stdout and "report:" in stdout
    code, _, err = cli(capsys, "demo", "--steps", 6, "--out", out, "--n-eval", 20)
    assert code == 2 and "holds a demo run of 4 steps" in error_line(err)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Workflow traps


def _image_folder(path, n=40):
    from PIL import Image

    path.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 6, np.uint8)).save(path / f"{i:03d}.png")
    return path


def test_a_held_out_reference_that_holds_training_images_is_an_error(tmp_path, capsys):
    images = _image_folder(tmp_path / "images")
    common = ["--codec", "identity", "--resolution", 8, "--no-progress", "--workers", 0]
    # the trap: a quick subset for training and "held-out" references of the same size picked the same images
    assert cli(capsys, "encode", images, "--out", tmp_path / "subset", "--limit", 10, *common)[0] == 0
    assert cli(capsys, "encode", images, "--out", tmp_path / "train", "--holdout", 10, *common)[0] == 0
    ref = tmp_path / "ref.npz"
    assert cli(capsys, "eval", "ref", images, "--holdout", 10, "--extractor", "pixels", "--out", ref,
               "--no-progress")[0] == 0
    net = ["--network", "unet-tiny", "--set", "network.options={attn_resolutions: [4]}", "--steps", 2, "--batch", 4,
           "--no-progress"]
    for name in ("subset", "train"):
        assert cli(capsys, *TRAIN, *net, "--data", tmp_path / name, "--out", tmp_path / f"run-{name}")[0] == 0
    code, _, err = cli(capsys, "eval", "--snapshot", tmp_path / "run-subset", "--ref", ref, "--n", 4, "--device",
                       "cpu", "--no-progress")
    assert code == 2 and "10 of its 10 images are in the training set" in error_line(err)
    result = tmp_path / "eval.json"
    assert cli(capsys, "eval", "--snapshot", tmp_path / "run-train", "--ref", ref, "--n", 4, "--device", "cpu",
               "--no-progress", "--out", result)[0] == 0
    assert json.loads(result.read_text())["reference_images_in_training"] == [0]
    # periodic evaluation inside training checks the same before it starts
    code, _, err = cli(capsys, *TRAIN, *net, "--data", tmp_path / "subset", "--out", tmp_path / "run-periodic",
                       "--set", "logging.eval_every_steps=1", "--set", f"logging.eval_reference={ref}")
    assert code == 2 and "images are in the training set" in error_line(err)


def test_limit_spreads_over_the_source_everywhere(tmp_path):
    from slct.data.encode import select_indices
    from slct.eval.reference import image_reader

    images = _image_folder(tmp_path / "images")
    count, read = image_reader(images, limit=4)
    expected = select_indices(40, 4) * 6  # the pixel value of image i is 6 i
    assert count == 4 and [int(im[0, 0, 0]) for im in read(range(4))] == list(expected)


def test_encode_takes_out_like_every_command(tmp_path, capsys):
    images = _image_folder(tmp_path / "images", 4)
    common = ["--codec", "identity", "--resolution", 8, "--no-progress", "--workers", 0]
    assert cli(capsys, "encode", images, "--out", tmp_path / "a", *common)[0] == 0
    assert (tmp_path / "a" / "manifest.json").is_file()
    code, _, err = cli(capsys, "encode", images, tmp_path / "b", "--out", tmp_path / "c", *common)
    assert code == 2 and "two output directories" in error_line(err)


def test_no_progress_prints_plain_lines_and_the_final_line(tmp_path, capsys):
    code, out, _ = cli(capsys, *TRAIN, "--steps", 3, "--out", tmp_path / "run", "--no-progress")
    assert code == 0
    assert "step 3/3 loss " in out and "training finished in" in out
    assert re.search(r"step 3/3 loss \S+ N \d+ c \S+ \d+ img/s", out)  # the curriculum beside the loss


def test_metrics_after_a_resume_have_no_repeated_steps(tmp_path):
    train(tiny_cfg(10), tmp_path, until_step=6, progress=False)  # checkpoints 0, 4, 6; metrics rows 1..6
    checkpoint.checkpoint_path(tmp_path, 6).unlink()  # as if killed after step 6's log line, before its checkpoint
    train(tiny_cfg(10), tmp_path, progress=False)  # resumes from 4: rows 5 and 6 are replayed
    steps = [json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl") if '"step"' in r]
    assert steps == list(range(1, 11))
