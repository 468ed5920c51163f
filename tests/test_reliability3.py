"""Reliability round 3 (README "What slct guarantees"): a distillation resumes with the teacher it started with,
finite bit rot in checkpoints and snapshots is caught by their checksums, classes are named by real folders, teacher
and student conditioning must agree, a full disk is recognised whatever the writer says, a run that cannot learn
stops, the rough edges of the CLI, the import graph, and training across two nodes."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from slct import checkpoint
from slct.config import load_config
from slct.training import train

from test_reliability import TINY, cli, error_line, tiny_cfg  # noqa: E402  the shared helpers of the first round

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--data-preset", "digits", "--batch", "8", "--device", "cpu", "--no-progress",
          "--set", "network.name=unet-tiny", "--set", "logging.sample_every_steps=0",
          "--set", "logging.log_every_steps=1", "--set", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A 4-step ldm run with snapshots at steps 2 and 4 (its newest at 4)."""
    run = tmp_path_factory.mktemp("teacher") / "ldm"
    train(load_config("ldm", "digits", sets=[*TINY, "train.total_steps=4", "train.batch_size=8",
                                             "checkpoint.every_steps=2", "checkpoint.snapshot_every_steps=2"]),
          run, progress=False)
    return run


# ---------------------------------------------------------------------------------------------------------------------
# 1. a resumed distillation keeps its teacher


def test_a_resumed_distillation_keeps_the_teacher_it_started_with(teacher_run, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    (teacher / "snapshot-00000004.pt").rename(teacher / "later.pt")  # the run's newest snapshot is step 2 for now
    student = ["train", "--preset", "ilcd", *DIGITS, "--steps", "6", "--teacher", teacher, "--out", tmp_path / "s"]
    code, out, err = cli(capsys, *student, "--until-step", "2")
    assert code == 0, err
    first = teacher / "snapshot-00000002.pt"
    assert f"teacher: {first.resolve()} (edm model, step 2" in out and "sha256 " in out
    recorded = json.loads((tmp_path / "s" / "run.json").read_text())["teacher"]
    assert recorded["path"] == str(first.resolve()) and len(recorded["sha256"]) == 64
    (teacher / "later.pt").rename(teacher / "snapshot-00000004.pt")  # the teacher run trained on meanwhile
    code, out, err = cli(capsys, *student, "--until-step", "4")
    assert code == 0, err
    assert f"teacher: {first.resolve()} (edm model, step 2" in out  # the file it started with, not the newest
    assert json.loads((tmp_path / "s" / "run.json").read_text())["teacher"] == recorded
    # the recorded file changed: stop in one line, before any step
    payload = checkpoint.load(first, expect=checkpoint.SNAPSHOT_FORMAT)
    payload["step"] = 3
    checkpoint.save_atomic(payload, first)
    code, _, err = cli(capsys, *student)
    line = error_line(err)
    assert code == 2 and "has changed since the run started" in line and str(first.resolve()) in line
    first.unlink()
    code, _, err = cli(capsys, *student)
    line = error_line(err)
    assert code == 2 and "which is gone" in line and str(first.resolve()) in line
    assert checkpoint.latest_checkpoint(tmp_path / "s").name == "checkpoint-00000004.pt"  # nothing trained


def test_init_names_the_file_it_loaded(teacher_run, tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--preset", "ilct", *DIGITS, "--steps", "2", "--init", teacher_run,
                         "--out", tmp_path / "tuned")
    assert code == 0, err
    newest = (teacher_run / "snapshot-00000004.pt").resolve()
    assert f"initialised from {newest} (edm model, step 4" in out
    assert json.loads((tmp_path / "tuned" / "run.json").read_text())["init"]["sha256"]


# ---------------------------------------------------------------------------------------------------------------------
# 2. finite bit rot


def _rot(path: Path, edit) -> None:
    """Change a value inside a saved file the way bit rot would: a valid torch file, the old checksum kept."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


@pytest.mark.parametrize("where", ["weights", "adam"])
def test_finite_bit_rot_in_the_newest_checkpoint_falls_back_bitwise(tmp_path, capsys, where):
    reference = tmp_path / "reference"
    train(tiny_cfg(12), reference, progress=False)
    run = tmp_path / "run"
    train(tiny_cfg(12), run, until_step=8, progress=False)  # checkpoints 0, 4, 8

    def edit(payload):
        if where == "weights":
            t = next(v for v in payload["model"].values() if v.is_floating_point() and v.numel() >= 4)
            t.view(-1)[:4] = 65536.0  # 16 bytes, finite
        else:
            state = next(iter(payload["optimizer"]["state"].values()))
            state["exp_avg_sq"].view(-1)[0] = 2e32

    newest = run / "checkpoints" / "checkpoint-00000008.pt"
    _rot(newest, edit)
    result = train(tiny_cfg(12), run, progress="lines")
    _, err = capsys.readouterr()
    assert result.finished
    warning = [line for line in err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "checksum" in warning[0] and "resuming from checkpoint-00000004.pt" in warning[0]
    a, b = checkpoint.load(checkpoint.latest_checkpoint(run))["model"], \
        checkpoint.load(checkpoint.latest_checkpoint(reference))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bit_rot_in_a_snapshot_and_random_bytes_are_damage(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(4), run, progress=False)
    snap = run / "snapshot-00000004.pt"
    payload = checkpoint.load(snap, expect=checkpoint.SNAPSHOT_FORMAT)  # slct's files verify and load
    assert checkpoint.CHECKSUM_KEY not in payload

    def edit(p):
        weights = next(iter(p["ema"].values()))
        next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = 65536.0

    _rot(snap, edit)
    code, _, err = cli(capsys, "sample", snap, "--n", "2", "--out", tmp_path / "s")
    line = error_line(err)
    assert code == 2 and "is damaged" in line and "checksum" in line and not (tmp_path / "s").exists()
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    code, _, err = cli(capsys, "sample", noise, "--n", "2")
    line = error_line(err)
    assert code == 2 and "damaged" in line and "Python objects" not in line


def test_files_without_a_checksum_still_load(tmp_path):
    """Checkpoints and snapshots written before checksums existed load as they are."""
    run = tmp_path / "run"
    train(tiny_cfg(4), run, progress=False)
    path = run / "snapshot-00000004.pt"
    payload = torch.load(path, weights_only=True)
    del payload[checkpoint.CHECKSUM_KEY]
    torch.save(payload, path)
    assert checkpoint.load(path, expect=checkpoint.SNAPSHOT_FORMAT)["step"] == 4


# ---------------------------------------------------------------------------------------------------------------------
# 3. classes named by real folders


def test_a_link_read_before_its_folder_does_not_rename_the_class(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    (root / "a-link").symlink_to(root / "cats", target_is_directory=True)  # sorts before the real folder
    code, _, err = cli(capsys, "encode", root, "--out", tmp_path / "latents", "--codec", "identity",
                       "--resolution", "8", "--workers", "0", "--labels", "folder", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["class_names"] == ["cats", "dogs"] and manifest["count"] == 4
    (skip,) = manifest["skipped"]
    assert skip["name"] == "a-link" and skip["reason"] == "symlink-loop" and "read as cats" in skip["detail"]


# ---------------------------------------------------------------------------------------------------------------------
# 4. teacher and student conditioning


def test_teacher_and_student_conditioning_must_agree(teacher_run, tmp_path, capsys):
    conditional_teacher = tmp_path / "cond-ldm"
    train(load_config("ldm", "digits", sets=[*TINY, "train.total_steps=2", "train.batch_size=8",
                                             "data.conditional=true"]), conditional_teacher, progress=False)
    cases = [(teacher_run, ["--set", "data.conditional=true"], "is unconditional and this run is class-conditional"),
             (conditional_teacher, [], "is class-conditional (10 classes) and this run is unconditional")]
    for teacher, extra, message in cases:
        out = tmp_path / "student"
        code, _, err = cli(capsys, "train", "--preset", "ilcd", *DIGITS, "--steps", "2", "--teacher", teacher,
                           *extra, "--out", out)
        line = error_line(err)
        assert code == 2 and message in line and str(teacher) in line
        assert not out.exists()  # checked before the run directory exists


# ---------------------------------------------------------------------------------------------------------------------
# 5. a full disk, whatever the writer says


def test_export_recognises_a_full_disk_in_a_safetensors_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from safetensors import SafetensorError

    from slct import diffusers_pipeline

    run = tmp_path / "run"
    train(tiny_cfg(2), run, progress=False)

    def full(self, folder, **kwargs):  # what safetensors raises, with plenty of space left after the failed write
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(diffusers_pipeline.SLCTPipeline, "save_pretrained", full)
    out = tmp_path / "pipe"
    code, _, err = cli(capsys, "export", run, out)
    line = error_line(err)
    assert code == 2 and line.count("\n") == 0 and f"no space left on {tmp_path}" in line
    assert "Traceback" not in err and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# 6. a run that cannot learn


@pytest.mark.parametrize("key", ["objective.soflow_p=1e30", "objective.soflow_eps=1e30", "objective.meanflow_p=9"])
def test_degenerate_adaptive_weights_are_refused(tmp_path, capsys, key):
    code, _, err = cli(capsys, "train", "--preset", "soflow", *DIGITS, "--steps", "2", "--set", key,
                       "--out", tmp_path / "r")
    line = error_line(err)
    assert code == 2 and "would underflow to 0" in line and not (tmp_path / "r").exists()


def test_a_run_whose_gradient_stays_zero_stops_in_one_line(tmp_path):
    from slct.training.health import TrainingStalled

    cfg = tiny_cfg(50, "train.max_zero_grad_steps=5")
    with pytest.raises(TrainingStalled, match="exactly zero for 5 steps in a row up to step 5"):
        train(cfg, tmp_path, progress=False, loss_hook=lambda step, loss: loss * 0)
    # the check is off at 0, and a run with gradients never trips it
    assert train(tiny_cfg(6, "train.max_zero_grad_steps=0"), tmp_path / "off", progress=False,
                 loss_hook=lambda step, loss: loss * 0).finished
    assert train(tiny_cfg(6, "train.max_zero_grad_steps=1"), tmp_path / "learns", progress=False).finished


def test_grad_scale_refuses_clipping_and_coupled_decay():
    for extra in (["optim.grad_clip=1.0"], ["optim.decoupled_weight_decay=false", "optim.weight_decay=1e-4"]):
        with pytest.raises(ValueError, match="act on the scaled gradients"):
            load_config("slct", "utkface64", sets=extra)
    load_config("slct", "utkface64")  # the preset's own combination is fine


# ---------------------------------------------------------------------------------------------------------------------
# 7. rough edges


def test_ldm_sampling_below_its_solvers_nfe_names_the_rule(tmp_path, capsys):
    run = tmp_path / "ldm"
    train(load_config("ldm", "digits", sets=[*TINY, "train.total_steps=2", "train.batch_size=8"]), run,
          progress=False)
    code, _, err = cli(capsys, "sample", run, "--nfe", "1", "--n", "2", "--out", tmp_path / "s")
    line = error_line(err)
    assert code == 2 and "heun sampler needs at least 3" in line and "2 x steps - 1" in line
    assert "n must be an integer" not in line


def test_dry_run_with_a_missing_data_folder_says_so(tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--preset", "slct", "--data-preset", "utkface64", "--data",
                         tmp_path / "nowhere", "--dry-run")
    assert code == 0 and f"{tmp_path / 'nowhere'} could not be read" in out and "pass --data" not in out


def test_help_texts_show_no_empty_or_repeated_defaults(capsys):
    from slct.cli import COMMANDS

    for command in COMMANDS:
        code, out, _ = cli(capsys, *command.split("-"), "--help")
        assert code == 0, command
        text = " ".join(out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "(default: []" not in text, command


def test_warnings_print_as_one_line_without_source_paths(capsys):
    from slct import cli as cli_module

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        cli_module._one_line_warnings()
        warnings.warn("the covariance product is singular\nsecond line", RuntimeWarning)
        warnings.warn("the covariance product is singular\nsecond line", RuntimeWarning)  # once
    err = capsys.readouterr().err
    assert err == "warning: the covariance product is singular\n"


def test_encode_no_progress_prints_one_final_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    code, out, err = cli(capsys, "encode", tmp_path / "img", "--out", tmp_path / "lat", "--codec", "identity",
                         "--resolution", "8", "--workers", "0", "--no-progress")
    assert code == 0, err
    assert sum("(100%)" in line for line in out.splitlines()) == 1


def test_until_step_says_how_to_continue(tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--preset", "slct", *DIGITS, "--steps", "4", "--until-step", "2",
                         "--out", tmp_path / "r")
    assert code == 0, err
    assert "re-run without --until-step (or with a later one) to continue from step 2" in out
    assert "re-run the same command" not in out


def test_the_workflow_folders_are_git_ignored():
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"/latents/", "/refs/", "/runs/", "/pipelines/"} <= set(ignored)


def test_a_second_sample_into_the_same_folder_replaces_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_cfg(2), run, progress=False)
    out = tmp_path / "s"
    assert cli(capsys, "sample", run, "--n", "2", "--nfe", "1", "2", "--out", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert cli(capsys, "sample", run, "--n", "2", "--nfe", "1", "--out", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid-nfe1.png", "notes.txt", "samples.json"]
    assert json.loads((out / "samples.json").read_text())["nfe"] == [1]


def test_the_demo_stops_when_the_machine_gets_slower(tmp_path, capsys, monkeypatch):
    from slct.commands import demo

    monkeypatch.setattr(demo, "calibrate_steps", lambda *a, **k: (100_000, 0.001))  # a fast start, then slow
    code, out, err = cli(capsys, "demo", "--out", tmp_path / "demo", "--minutes", "0.002", "--device", "cpu")
    assert code == 0, err
    assert "the machine got slower after the calibration" in out and "`slct demo` again continues" in out


# ---------------------------------------------------------------------------------------------------------------------
# 8. the house: no import circles


def _import_graph() -> dict[str, set[str]]:
    """slct's modules and the slct modules each imports (at the top or inside functions)."""
    root = REPO / "src"
    modules = {}
    for path in (root / "slct").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("slct"):
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                        for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("slct")}
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def test_no_import_circles_beyond_a_package_and_its_own_modules():
    graph = _import_graph()

    def reaches(a, b, seen=None):
        seen = seen if seen is not None else set()
        for c in graph[a] - seen:
            seen.add(c)
            if c == b or reaches(c, b, seen):
                return True
        return False

    circles = [(a, b) for a in graph for b in graph[a] if reaches(b, a)
               and not (b.startswith(a + ".") or a.startswith(b + "."))]  # a registry package and its modules
    assert circles == []
    assert "slct.objectives" not in graph["slct.precond"] and "slct.training.monitor" not in graph[
        "slct.training.plots"]


# ---------------------------------------------------------------------------------------------------------------------
# 9. many machines


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_process_and_only_global_rank_0_writes(tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 with a static rendezvous on 127.0.0.1 (gloo), each node given its own
    --out: node 1 must write nothing (as on a cluster without a shared file system), node 0 must train the run a
    single process trains (OT on the global batch, r = 1)."""
    sets = ["network.name=unet-tiny", "logging.sample_every_steps=0", "train.ot_scope=global",
            "checkpoint.every_steps=6"]
    args = ["train", "--preset", "diff-r1.0", "--data-preset", "digits", "--steps", "6", "--batch", "16",
            "--device", "cpu", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "slct", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "slct",
                               *args, "--out", str(tmp_path / f"node{r}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err
    assert not (tmp_path / "node1").exists()  # global rank 1 wrote nothing
    assert json.loads((tmp_path / "node0" / "run.json").read_text())["world_size"] == 2
    a = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "one"))["model"]
    b = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "node0"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    initial = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "one")[0])["model"]
    assert any(not torch.equal(initial[k], a[k]) for k in a)  # it trained: equality is not vacuous
