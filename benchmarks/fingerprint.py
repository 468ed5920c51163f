"""Fingerprints of tiny training runs: the check that a restructure changed no behaviour.

Each run trains the digits preset with ``unet-tiny`` for a few steps through the public API (``slct.train``) and is
reduced to a SHA-256 of everything a resumed or sampled run depends on: the final checkpoint's weights, optimizer
moments, EMAs and training state, the final snapshot's weights, and the trajectory columns of metrics.jsonl (loss terms, N, c, lr, gradient norm; events by their step, not their
wording). The
runs cover every objective, the measured c, a run trained in two slices (resume) and a run that rolls back after
injected non-finite losses.

    python benchmarks/fingerprint.py --out fp.json             # record
    python benchmarks/fingerprint.py --check fp.json           # compare: exit 1 naming the runs that differ

benchmarks/results/fingerprints.json holds the runs of the code before the split of slct.training and
slct.objectives into packages (commit 0c3a78f); tests/test_fingerprints.py checks that they still come out bitwise
equal. A change that alters training on purpose records the file anew (--out) and says so in its commit.

Bitwise equality only holds on the same torch build and CPU (kernels differ between AVX2 and AVX-512, and between
CPU models with the same instruction set); the file records all three, and ``--check`` on another machine compares the weight sums to 1e-4 instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

# a 4-sample end-of-run grid and no training.png (neither is fingerprinted): seconds saved, 35-NFE ldm/fm grids included
TINY = ["network.name=unet-tiny", "logging.sample_every_steps=0", "logging.grid_size=4", "logging.plot=false",
        "logging.log_every_steps=2", "train.batch_size=8", "checkpoint.every_steps=3", "train.device=cpu",
        "train.ema_decays=[0.9]"]
STEPS = 6
# name -> (method preset, extra --set, how it runs)
RUNS = {
    "slct": ("slct", [], "whole"),
    "slct-calibrated-c": ("slct-calibrated-c", ["objective.c_calibration_batches=1"], "whole"),
    "ilct": ("ilct", [], "whole"),
    "ldm": ("ldm", [], "whole"),
    "meanflow": ("meanflow", [], "whole"),
    "shortcut": ("shortcut", [], "whole"),
    "slct-sliced": ("slct", [], "sliced"),
    "slct-rollback": ("slct", ["train.max_bad_steps=2"], "rollback"),
}
# what a run's metrics say about its trajectory (new diagnostics may join metrics.jsonl without changing a run)
TRAJECTORY = ("step", "nimg", "loss", "consistency", "diffusion", "n_scales", "c", "lr", "bad_steps", "grad_norm")
STATE = ("step", "nimg", "lr_scale", "bad_steps", "rollbacks", "c_table")  # what the training state held at 0c3a78f


def _environment() -> dict:
    # the CPU model too: two AVX-512 CPUs (an AMD EPYC and an Intel Xeon) gave different bits with the same build
    from common import cpu_model

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_model()}


def _hash_tensors(h, tree, prefix: str = "") -> None:
    if isinstance(tree, torch.Tensor):
        h.update(prefix.encode())
        h.update(str(tree.dtype).encode())
        h.update(tree.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(tree, dict):
        for k in sorted(tree, key=str):
            _hash_tensors(h, tree[k], f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _hash_tensors(h, v, f"{prefix}/{i}")
    else:
        h.update(f"{prefix}={tree!r}".encode())


def fingerprint(run_dir: Path) -> dict:
    from slct import checkpoint

    ckpt = checkpoint.load(checkpoint.latest_checkpoint(run_dir))
    snaps = sorted(run_dir.glob("snapshot-*.pt"))
    snap = checkpoint.load(snaps[-1], expect=checkpoint.SNAPSHOT_FORMAT)
    state = {k: ckpt["state"][k] for k in STATE}
    h = hashlib.sha256()
    _hash_tensors(h, {"model": ckpt["model"], "optimizer": ckpt["optimizer"], "ema": ckpt["ema"], "state": state,
                      "snapshot": snap["ema"]})
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "event" in row:  # when something happened (a rollback, a calibration), not how the line words it
            row = {"event_step": row.get("event_step")}
        elif "step" in row:
            row = {k: row[k] for k in TRAJECTORY if k in row}
        else:
            continue  # diagnostics of other kinds
        h.update(json.dumps(row, sort_keys=True).encode())
    weight_sum = float(sum(t.double().sum() for t in ckpt["model"].values() if t.is_floating_point()))
    return {"sha256": h.hexdigest(), "weight_sum": weight_sum, "step": int(ckpt["state"]["step"])}


def run_one(name: str, work: Path) -> dict:
    import slct

    preset, extra, how = RUNS[name]
    cfg = slct.load_config(preset, "digits", sets=[*TINY, f"train.total_steps={STEPS}", *extra])
    run_dir = work / name
    if how == "sliced":
        slct.train(cfg, run_dir, until_step=STEPS // 2, progress=False)
        slct.train(slct.load_config(preset, "digits", sets=[*TINY, f"train.total_steps={STEPS}", *extra]), run_dir,
                   progress=False)
    elif how == "rollback":
        def hook(step, loss, seen=set()):  # steps 4 and 5 non-finite once each: a rollback to checkpoint 3
            if step in (4, 5) and step not in seen:
                seen.add(step)
                return loss * float("nan")
            return loss

        slct.train(cfg, run_dir, progress=False, loss_hook=hook)
    else:
        slct.train(cfg, run_dir, progress=False)
    return fingerprint(run_dir)


def record(names) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same reduction order whatever the machine's core count
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return {"environment": _environment(), "steps": STEPS,
                    "runs": {name: run_one(name, Path(tmp)) for name in names}}
    finally:
        torch.set_num_threads(threads)


def compare(saved: dict, now: dict) -> list[str]:
    """The runs whose fingerprints differ (bitwise on the recorded environment, weight sums to 1e-4 elsewhere)."""
    exact = saved["environment"] == now["environment"]
    bad = []
    for name, got in now["runs"].items():
        want = saved["runs"][name]
        if exact and got["sha256"] != want["sha256"]:
            bad.append(f"{name}: sha256 {got['sha256'][:12]} != {want['sha256'][:12]}")
        elif not exact and abs(got["weight_sum"] - want["weight_sum"]) > 1e-4 * max(1.0, abs(want["weight_sum"])):
            bad.append(f"{name}: weight sum {got['weight_sum']:.8g} != {want['weight_sum']:.8g}")
        elif got["step"] != want["step"]:
            bad.append(f"{name}: step {got['step']} != {want['step']}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the fingerprints to this JSON file")
    g.add_argument("--check", help="compare with the fingerprints in this JSON file")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    a = p.parse_args(argv)
    if a.out:
        result = record(a.runs)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    saved = json.loads(Path(a.check).read_text())
    names = [r for r in a.runs if r in saved["runs"]]
    bad = compare(saved, record(names))
    for line in bad:
        print(line, file=sys.stderr)
    mode = "bitwise" if saved["environment"] == _environment() else "to 1e-4 (another torch build or CPU)"
    print(f"{len(names) - len(bad)} of {len(names)} runs match {mode}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
