"""The paper's premise, tested: does sLCT beat iLCT once the latents hold impulsive outliers? The same faces are
encoded plain and through the outlier codec at several strengths (`slct encode --outliers spike:K`, decoded exactly
by its inverse), and iLCT, each rung of the paper's Table 2a ladder and sLCT train on each, with the leaderboard's
budget and harness (UTKFace 64 px, TAEF2, `unet-small`, the utkface64 preset, 2,000 steps, 3 seeds).

    python benchmarks/premise.py --print               # the slct commands, done ones marked
    python benchmarks/premise.py                       # data, train, evaluate, report; re-run to continue
    python benchmarks/premise.py --stage report        # tables and the figure from what has been scored

Strengths (``--strengths``): ``1`` is the plain codec; ``spike:K`` and ``tail:K`` are the outlier codec's modes
(docs/data.md: TAEF2's excess kurtosis 0.17 plain, 112 at spike:10, 199 at spike:30). Methods (``--methods``):
``ilct`` -> ``ladder-cauchy`` -> ``ladder-diff`` -> ``ladder-ot`` -> ``ladder-adaptive-c`` (sLCT's losses on
GroupNorm) -> ``slct`` (+ Non-scaling LayerNorm). Every run's final snapshot is scored with `slct eval` at 1 and 2
NFE against the held-out faces (the images are decoded through the codec's inverse, so every strength is judged on
the same reference; MobileNetV2 FD, ramp-up EMA). Runs go seed by seed, iLCT and sLCT at every strength first, so a
board stopped early answers the main question first.

A new machine has no run folders: the seeds the committed report scored are neither retrained nor dropped, their
rows come from it (per seed where it lists ``values``; older rows, kept as mean +- sd, are pooled exactly with the
seeds scored here), and its sample strip stays, with the runs here that it lacks added beside it.

Report (results/premise-utkface64-STEPSsteps.{md,json,png}): FD mean +- sd per method and strength, at each
strength whether sLCT beats iLCT by more than 2 pooled sd (and the reverse), each rung against the one before, and
FD against strength, one line per method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_sibling, machine, write_report  # noqa: E402

ablation = load_sibling("ablation")
leaderboard = load_sibling("leaderboard")

METHODS = ["ilct", "ladder-cauchy", "ladder-diff", "ladder-ot", "ladder-adaptive-c", "slct"]
STRENGTHS = ["1", "spike:10", "spike:30"]


def tag(strength: str) -> str:
    return "plain" if strength in ("1", "1.0") else strength.replace(":", "")


def data_dir(a, strength: str) -> Path:
    """The plain latents are the leaderboard's (benchmarks/ablation.py's data stage makes them)."""
    plain = tag(strength) == "plain"
    return Path(a.work) / (f"utk{a.resolution}-train" + ("" if plain else f"-{tag(strength)}"))


def run_dir(a, strength: str, method: str, seed: int) -> Path:
    """On plain latents the runs are the leaderboard's own entries (the same command): not trained twice."""
    if tag(strength) == "plain":
        return Path(a.work) / f"leaderboard-{a.steps}steps" / f"{method}-seed{seed}"
    return Path(a.work) / f"premise-{a.steps}steps" / tag(strength) / f"{method}-seed{seed}"


def leaderboard_archive(a) -> list[dict]:
    """The committed leaderboard report's final run rows of this budget (read once per plan or report)."""
    return [r for r in leaderboard.archived_rows(argparse.Namespace(budget=a.steps, archive=None)) if r["final"]]


def archived(board: list[dict], method: str, seed: int) -> list[dict]:
    """A plain run's final rows from the committed leaderboard report (``board``), when its folder is gone."""
    return [r for r in board if r["entry"] == method and r["seed"] == seed]


def committed(a) -> dict:
    """The committed report of this budget (results/premise-utkface64-STEPSsteps.json), {} when there is none: a
    run whose folder is gone (a new machine) is reported from there, not retrained and not dropped."""
    path = ablation.RESULTS / f"premise-utkface64-{a.steps}steps.json"
    return json.loads(path.read_text()) if path.exists() else {}


def archived_groups(row: dict, scored: set) -> list[tuple[list[int], float, float]]:
    """An archived summary row as (seeds, sum, sum of squares) groups without the seeds in ``scored`` (scored here
    again): each seed whose value the row lists on its own, then the rest pooled as the exact sums its mean and sd
    imply (reports before per-seed values kept only those), dropped when one of them is scored again."""
    values = {int(seed): fd for seed, fd in row.get("values", [])}
    groups = [([seed], fd, fd * fd) for seed, fd in values.items() if seed not in scored]
    rest = [seed for seed in row["seeds"] if seed not in values]
    if rest and not scored & set(rest):
        n = len(row["seeds"])
        groups.append((rest, n * row["fd"] - sum(values.values()),
                       (n - 1) * row["fd_sd"] ** 2 + n * row["fd"] ** 2 - sum(v * v for v in values.values())))
    return groups


def pooled_mean_sd(groups: list[tuple[list[int], float, float]]) -> tuple[float, float, list[int]]:
    """Mean and sample sd (ddof 1) of (seeds, sum, sum of squares) groups together: exact, from counts and sums."""
    n = sum(len(seeds) for seeds, _, _ in groups)
    mean = sum(total for _, total, _ in groups) / n
    squares = sum(q for _, _, q in groups)
    sd = (max(squares - n * mean ** 2, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, sd, sorted(seed for seeds, _, _ in groups for seed in seeds)


def encode_args(a, strength: str) -> list[str]:
    out = ["encode", a.zip, "--out", str(data_dir(a, strength)), "--codec", "taef2", "--resolution",
           str(a.resolution), "--holdout", str(a.holdout), "--split", "train", "--no-progress"]
    return out + ([] if tag(strength) == "plain" else ["--outliers", strength])


def tasks(a, ref: Path) -> list:
    """Seed by seed; within a seed iLCT and sLCT at every strength first, then the ladder's middle rungs."""
    order = [m for m in ("ilct", "slct") if m in a.methods] + [m for m in a.methods if m not in ("ilct", "slct")]
    # seeds of (strength, method) the committed report scored, read once
    scored = {(r["strength"], r["method"]): set(r["seeds"]) for r in committed(a).get("summary", []) if r["nfe"] == 1}
    board = leaderboard_archive(a)
    out = []
    for seed in a.seeds:
        for method in order:
            for strength in a.strengths:
                run = run_dir(a, strength, method, seed)
                if tag(strength) == "plain" and not run.exists() and archived(board, method, seed):
                    continue  # scored on the leaderboard already
                if not run.exists() and seed in scored.get((strength, method), ()):
                    continue  # scored in the committed report, on an earlier machine
                final = run / f"snapshot-{a.steps:08d}.pt"
                cmd = ["train", "--preset", method, "--data-preset", "utkface64", "--data",
                       str(data_dir(a, strength)), "--out", str(run), "--steps", str(a.steps), "--seed", str(seed),
                       "--no-progress", "--set", "train.ema_power_every_steps=0"]
                what = f"{method} at {strength} seed {seed}"
                out.append(leaderboard.Task(what, final, cmd))
                out.append(leaderboard.Task(f"{what}: eval", leaderboard.eval_file(run, a.steps, a.n_eval, True),
                                            leaderboard.eval_command(run, a.steps, ref, a.n_eval), (final,)))
    return out


def kurtosis(a, strength: str) -> float | None:
    """The latents' excess kurtosis as `slct analyze --normalization per-element` reports it (4,096 samples, the
    authors' standardisation, all values pooled; docs/data.md's table): the x axis of the finding and the number
    `slct analyze` advises from. None: the latents are not here."""
    from slct.analyze import latent_kurtosis, load_latents
    from slct.data import LatentDataset

    path = data_dir(a, strength)
    if not (path / "manifest.json").exists():
        return None
    return latent_kurtosis(load_latents(LatentDataset(path, normalization="none"), 4096))


def summarize(a) -> list[dict]:
    """FD mean +- sd per (strength, method, NFE) over the seeds scored here, with the committed report's rows for
    seeds whose run folders are gone; ``values`` lists each seed's FD where it is known on its own."""
    old = {(r["strength"], r["method"], r["nfe"]): r for r in committed(a).get("summary", [])}
    board = leaderboard_archive(a)
    out = []
    for strength in a.strengths:
        for method in a.methods:
            per_nfe: dict[int, dict] = {}
            for seed in a.seeds:
                run = run_dir(a, strength, method, seed)
                path = leaderboard.eval_file(run, a.steps, a.n_eval, True)
                if path.exists():
                    results = json.loads(path.read_text())["results"]
                elif tag(strength) == "plain" and not run.exists():
                    results = archived(board, method, seed)
                else:
                    continue
                for r in results:
                    per_nfe.setdefault(r["nfe"], {})[seed] = r["fd"]
            nfes = set(per_nfe) | {k[2] for k in old if k[:2] == (strength, method)}
            for nfe in sorted(nfes):
                values = per_nfe.get(nfe, {})
                groups = [([seed], fd, fd * fd) for seed, fd in values.items()]
                row = old.get((strength, method, nfe))
                if row and tag(strength) != "plain":  # plain runs are archived per seed (the leaderboard's)
                    groups += [g for g in archived_groups(row, set(values)) if set(g[0]) <= set(a.seeds)
                               and not any(run_dir(a, strength, method, seed).exists() for seed in g[0])]
                if not groups:
                    continue
                fd, sd, seeds = pooled_mean_sd(groups)
                known = sorted((one[0], total) for one, total, _ in groups if len(one) == 1)
                out.append(dict(strength=strength, method=method, nfe=nfe, fd=fd, fd_sd=sd, seeds=seeds,
                                values=[list(v) for v in known]))
    return out


def comparisons(summary: list[dict], a) -> list[dict]:
    """At each strength and NFE: every recipe against iLCT, and each rung against the one before it."""
    rows = {(s["strength"], s["method"], s["nfe"]): s for s in summary}
    # every recipe against iLCT (where the order flips), then the ladder rung by rung (which part buys it), and the
    # loss side's later rungs at once (for a board without the middle rungs)
    pairs = [(m, "ilct") for m in METHODS[::-1] if m != "ilct"]
    pairs += [(b, m) for m, b in zip(METHODS, METHODS[1:]) if m != "ilct"] + [("ladder-adaptive-c", "ladder-cauchy")]
    out = []
    for strength in a.strengths:
        for better, than in pairs:
            for nfe in (1, 2):
                mine, other = rows.get((strength, better, nfe)), rows.get((strength, than, nfe))
                if mine and other:
                    diff, pooled, verdict = ablation.beats(mine, other)
                    out.append(dict(strength=strength, better=better, than=than, nfe=nfe, fd_difference=diff,
                                    pooled_sd=pooled, beats=verdict, worse=ablation.beats(other, mine)[2]))
    return out


def findings(pairs: list[dict], kurt: dict) -> list[dict]:
    """What `slct analyze` advises from (slct.analyze.PREMISE_FINDINGS): per strength with latents here and per
    recipe, its 1-step FD minus iLCT's and 2 pooled sd, where both were scored on 3 seeds."""
    return [dict(strength=c["strength"], kurtosis=kurt[c["strength"]], method=c["better"],
                 minus_ilct=-c["fd_difference"], two_pooled_sd=2 * c["pooled_sd"]) for c in pairs
            if c["than"] == "ilct" and c["nfe"] == 1 and c["beats"] is not None
            and kurt.get(c["strength"]) is not None]


def figure(summary: list[dict], a, path: Path, kurt: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, method in enumerate(a.methods):
        pts = {a.strengths.index(s["strength"]): (s["fd"], s["fd_sd"]) for s in summary
               if s["method"] == method and s["nfe"] == 1}
        if pts:  # a strength not scored is a gap (NaN breaks the line), not a straight line across it
            y, e = zip(*(pts.get(i, (float("nan"), float("nan"))) for i in range(len(a.strengths))))
            shift = 0.03 * (k - (len(a.methods) - 1) / 2)  # side by side, so the error bars stay readable
            ax.errorbar([i + shift for i in range(len(a.strengths))], y, yerr=e, marker="o", capsize=3,
                        label=method)
    ax.set_xticks(range(len(a.strengths)), [tag(s) + ("" if kurt.get(s) is None else f"\nkurtosis {kurt[s]:.0f}")
                                            for s in a.strengths])
    ax.set_xlabel("latent outliers (the outlier codec's strength; the latents' excess kurtosis)")
    ax.set_ylabel("1-step FD (MobileNetV2), mean +- sd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_strip(a, path: Path, skip: tuple = ()) -> list[str]:
    """The first row of each seed-0 run's final 1-step sample grid (the run's own `samples/`), one row per
    (strength, method) whose run folder is here and whose label is not in ``skip``, labelled; the labels written
    ([] : no file written)."""
    from PIL import Image, ImageDraw

    rows = []
    for strength in a.strengths:
        for method in a.methods:
            grid = run_dir(a, strength, method, 0) / "samples" / f"step-{a.steps:08d}-nfe1.png"
            if grid.exists() and f"{tag(strength)} {method}" not in skip:
                image = Image.open(grid).convert("RGB")
                rows.append((f"{tag(strength)} {method}", image.crop((0, 0, image.width, image.height // 8))))
    if not rows:
        return []
    label = 110
    out = Image.new("RGB", (label + max(r.width for _, r in rows), sum(r.height for _, r in rows)), "white")
    y = 0
    for text, row in rows:
        out.paste(row, (label, y))
        ImageDraw.Draw(out).multiline_text((4, y + 4), text.replace(" ", "\n"), fill="black")
        y += row.height
    out.save(path)
    return [text for text, _ in rows]


def strips(a, summary: list[dict], results: Path, stem: str, before: dict) -> dict:
    """The sample strip of every seed-0 run here; where some scored seed-0 runs are not here (their folders were on
    an earlier machine) the committed strip stays and the runs here that it lacks go to STEM-samples-added.png."""
    strip, added = results / f"{stem}-samples.png", results / f"{stem}-samples-added.png"
    scored = {f"{tag(r['strength'])} {r['method']}" for r in summary if r["nfe"] == 1 and 0 in r["seeds"]}
    here = {f"{tag(s)} {m}" for s in a.strengths for m in a.methods
            if (run_dir(a, s, m, 0) / "samples" / f"step-{a.steps:08d}-nfe1.png").exists()}
    if scored <= here or not strip.exists():
        return dict(strip=sample_strip(a, strip), added=[])
    # the kept strip's rows; None: unknown (a report from before they were recorded, or one that wrote no strip and
    # so not this file): every run here is added
    old = before.get("meta", {}).get("samples", {}).get("strip") or None
    return dict(strip=old, added=sample_strip(a, added, skip=tuple(old or ())))


def report(a) -> Path:
    summary = summarize(a)
    pairs = comparisons(summary, a)
    before = committed(a)  # read before this report overwrites it
    kurt = {s: kurtosis(a, s) for s in a.strengths}
    kurt = {s: before.get("kurtosis", {}).get(s) if k is None else k for s, k in kurt.items()}
    stem = f"premise-utkface64-{a.steps}steps"
    results = ablation.RESULTS
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    samples = strips(a, summary, results, stem, before)
    (results / f"{stem}.json").write_text(json.dumps(dict(
        meta=dict(command="python benchmarks/premise.py", date=date, machine=info, steps=a.steps, n_eval=a.n_eval,
                  strengths=a.strengths, methods=a.methods, seeds=a.seeds, samples=samples), kurtosis=kurt,
        summary=summary,
        comparisons=pairs, findings=findings(pairs, kurt)),
        indent=1) + "\n")
    lines = [f"# The paper's premise: iLCT and sLCT on latents with impulsive outliers ({a.steps} steps)", "",
             f"- Command: `python benchmarks/premise.py` ({date}); {info['cpu']}, {info['cpu_cores']} cores",
             "- UTKFace 64 px, TAEF2 through the outlier codec (docs/data.md), unet-small, the utkface64 preset; "
             f"FD-MobileNetV2 of {a.n_eval} samples (decoded through the inverse) against the held-out faces, "
             "ramp-up EMA; mean +- sd over seeds", "",
             "| method | NFE | " + " | ".join(tag(s) for s in a.strengths) + " |",
             "|---|---:|" + "---:|" * len(a.strengths),
             "| (latents' excess kurtosis) | | " + " | ".join("-" if kurt[s] is None else f"{kurt[s]:.2f}"
                                                             for s in a.strengths) + " |"]
    rows = {(s["strength"], s["method"], s["nfe"]): s for s in summary}
    for method in a.methods:
        for nfe in (1, 2):
            cells = []
            for strength in a.strengths:
                s = rows.get((strength, method, nfe))
                cells.append("-" if s is None else f"{s['fd']:.1f}" + (f" +- {s['fd_sd']:.1f} ({len(s['seeds'])})"
                                                                       if len(s["seeds"]) > 1 else " (1)"))
            lines.append(f"| {method} | {nfe} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "Comparisons (FD lower by, 2 pooled sd; a verdict from 3 seeds a side):", ""]
        for c in pairs:
            verdict = {True: "**yes**", False: "no", None: "not decided"}[c["beats"]]
            flip = " (worse beyond 2 pooled sd)" if c["worse"] else ""
            lines.append(f"- {tag(c['strength'])}, {c['nfe']} NFE: {c['better']} vs {c['than']}: "
                         f"{c['fd_difference']:+.1f} ({2 * c['pooled_sd']:.1f}): lower beyond 2 pooled sd: "
                         f"{verdict}{flip}")
    figure(summary, a, results / f"{stem}.png", kurt)
    lines += ["", f"![FD against strength]({stem}.png)"]
    if (results / f"{stem}-samples.png").exists() and samples["strip"] != []:
        lines += ["", "1-step samples, seed 0, final step (the first row of each run's grid; decoded through the "
                  "inverse):", "", f"![samples]({stem}-samples.png)"]
    if samples["added"]:
        lines += ["", f"Runs scored since that strip (trained on another machine): {', '.join(samples['added'])}:",
                  "", f"![samples, added]({stem}-samples-added.png)"]
    return write_report(results / f"{stem}.md", lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/slct-leaderboard", help="latents, reference and runs (the leaderboard's)")
    p.add_argument("--zip", default=str(HERE.parent.parent / "shared" / "data" / "utkface-200px.zip"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--strengths", nargs="+", default=STRENGTHS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    leaderboard.add_runner_arguments(p)
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    from slct.codecs import get_codec
    from slct.commands.encode import outlier_codec

    for strength in a.strengths:  # a malformed MODE:K fails here, before any work
        if tag(strength) != "plain":
            outlier_codec(get_codec("identity"), strength)
    work = Path(a.work)
    ref = work / f"ref-utk{a.resolution}-holdout{a.holdout}-mobilenetv2.npz"
    todo = tasks(a, ref)
    if a.print:
        for strength in a.strengths:
            print("slct " + shlex.join(encode_args(a, strength)))
        for t in todo:
            print(("[done] " if t.done.exists() else "") + "slct " + shlex.join(t.args))
        return
    if "data" in a.stage:
        work.mkdir(parents=True, exist_ok=True)
        for strength in a.strengths:
            ablation.sh(ablation.slct(*encode_args(a, strength)))
        ablation.stage_ref(a, work)
    if "train" in a.stage:
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
        if leaderboard.run_tasks(todo, a.jobs, threads):
            print("some commands failed or could not start (above); the report holds what is done", flush=True)
    if "report" in a.stage:
        report(a)


if __name__ == "__main__":
    main()
