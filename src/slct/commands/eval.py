"""`slct eval`: FID/FD, precision, recall, density and coverage of a snapshot or an image folder.

    slct eval ref SOURCE --extractor NAME [--resolution R] [--out FILE.npz]     # reference statistics
    slct eval --snapshot PATH --ref STATS.npz [--n 50000] [--nfe 1 2] [--out results.json]
    slct eval --images DIR --ref STATS.npz [--out results.json]

The protocol (REFERENCE.md [10], docs/evaluation.md): n samples from seeds seed..seed+n-1, decoded
through the run's codec, features extracted on the fly with one resize policy, compared with reference
statistics of the training images. Runs under torchrun. The JSON output records what is needed to
reproduce the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from slct.commands.options import add_ema_option, add_solver_option

HELP = "evaluate a snapshot or an image folder (FID/FD, precision, recall, density, coverage); `eval ref` makes reference stats"


def _extractor_arguments(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--extractor", default=default,
                   help="feature space: inception (FID), dinov2 (FD-DINOv2), vgg16 (the paper's recall), mobilenetv2 "
                   "(offline stand-in), pixels (tests, demo)" + ("" if default else "; None: the reference's"))
    p.add_argument("--protocol", default="slct" if default else None, choices=["slct", "pytorch-fid"],
                   help="how images reach the network: slct (PIL bicubic on uint8) or pytorch-fid (the paper "
                   "authors' FID: bilinear in float inside the network)" + ("" if default else
                                                                           "; None: the reference's"))
    p.add_argument("--weights", default=None, help="extractor weight file; None: looked up (docs/evaluation.md)")
    p.add_argument("--model", default=None, help="network size of extractors that have several: dinov2 vitl14 "
                   "(FD-DINOv2, the default), vitb14, vits14" + ("" if default else "; None: the reference's"))
    p.add_argument("--download", action="store_true", help="download missing extractor weights into the torch hub cache")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (per process)")
    p.add_argument("--device", default="auto", help="auto: CUDA when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--snapshot", default=None, help="a snapshot-*.pt or a run directory (its newest snapshot)")
    src.add_argument("--images", default=None, help="a folder or .zip of generated images")
    p.add_argument("--ref", nargs="+", default=None, metavar="STATS.npz",
                   help="reference statistics (from `slct eval ref`); several (e.g. inception and vgg16) share "
                   "one pass of generation")
    p.add_argument("--n", type=int, default=50_000,
                   help="samples generated from --snapshot per NFE (50,000: the FID protocol; on a CPU that takes "
                   "long, --n 5000 gives a quicker, noisier estimate)")
    p.add_argument("--nfe", type=int, nargs="+", default=None,
                   help="network evaluations to evaluate; None: the run's (1 2 for consistency models)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i, whatever the batch or process count")
    add_solver_option(p)
    add_ema_option(p)
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="class-conditional snapshots: balanced (seed mod K), random, none, or class names / ids; "
                   "None: the reference's class (`eval ref --class`), else balanced")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance weight (ldm baseline trained with label dropout; 1: none)")
    p.add_argument("--limit", type=int, default=None,
                   help="use N images of --images spread evenly over them (as `slct encode --limit`)")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall (3: the paper's recall)")
    p.add_argument("--max-pr-samples", type=int, default=50_000,
                   help="generated samples used by precision/recall (0: skip them)")
    p.add_argument("--out", default=None, help="write the results and their provenance to this JSON file")
    _extractor_arguments(p, default=None)

    p.epilog = "reference statistics: slct eval ref SOURCE --extractor NAME --out STATS.npz (see slct eval ref --help)"


def add_ref_arguments(ref: argparse.ArgumentParser) -> None:
    """`slct eval ref`'s arguments (a command of its own: see slct.commands.eval_ref)."""
    ref.add_argument("source", help="folder or .zip of images, a latent dataset directory, or builtin:NAME")
    ref.add_argument("--resolution", type=int, default=None,
                     help="center-crop and resize real images to the training resolution first, as `slct encode` "
                     "does; None: images as stored")
    ref.add_argument("--resample", default="bicubic", help="PIL filter of that resize (as `slct encode --resample`)")
    ref.add_argument("--out", default=None, help="output .npz; None: a cache file keyed by source, extractor, "
                     "resolution and resize method under $SLCT_CACHE or ~/.cache/slct/refs")
    ref.add_argument("--max-features", type=int, default=50_000, help="real features kept for precision/recall")
    ref.add_argument("--limit", type=int, default=None,
                     help="use N images spread evenly over the source (as `slct encode --limit`)")
    ref.add_argument("--holdout", type=int, default=0, metavar="N",
                     help="images held out as `slct encode --holdout N` does (same N, same images)")
    ref.add_argument("--split", choices=["all", "train", "holdout"], default=None,
                     help="which images of a folder/zip (default: holdout when --holdout is given, else all)")
    ref.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                     help="only this class's images (a class sub-folder name or id; a labelled latent dataset's "
                     "class): the reference for per-class evaluation of a conditional model")
    ref.add_argument("--force", action="store_true", help="recompute even if the output exists")
    _extractor_arguments(ref, default="inception")


def run(args) -> int:
    return run_eval(args)


def _extractor(args, name: str, device, reference_spec: dict | None = None):
    """The extractor ``name`` with the CLI's options; a reference's spec fixes the rest (e.g. pixels' size)."""
    import inspect

    from slct.eval import EXTRACTORS, get_extractor

    kwargs: dict[str, Any] = {}
    if args.weights is not None:
        kwargs["weights"] = args.weights
    if args.download:
        kwargs["download"] = True
    if name in ("inception", "vgg16", "dinov2"):
        kwargs.update(device=device, batch_size=args.batch_size)
    if reference_spec and reference_spec.get("name") == name and name in EXTRACTORS:
        kwargs.update(EXTRACTORS[name].options_from_spec(reference_spec))
    if getattr(args, "model", None) is not None:
        if "model" not in inspect.signature(EXTRACTORS[name].__init__).parameters:
            raise ValueError(f"--model goes with --extractor dinov2, not {name}")
        kwargs["model"] = args.model
    if getattr(args, "protocol", None) is not None:  # an explicit --protocol wins; a mismatch is refused later
        kwargs["protocol"] = args.protocol
    return get_extractor(name, **kwargs)


def _device(name: str):
    from slct.training import resolve_device

    return resolve_device(name)


def run_ref(args) -> int:
    from slct.eval.reference import compute_reference, default_reference_path, load_reference, save_reference

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    extractor = _extractor(args, args.extractor, device)
    max_features = args.max_features if args.max_features > 0 else None
    split = args.split or ("holdout" if args.holdout else "all")
    out = Path(args.out) if args.out else default_reference_path(args.source, extractor, args.resolution,
                                                                  args.resample, max_features, args.limit,
                                                                  args.holdout, split, args.class_name)
    if out.exists() and not args.force:
        ref = load_reference(out)
        m = ref.manifest
        same_resolution = m.get("resolution") == args.resolution or (m.get("source_kind") == "latents"
                                                                      and args.resolution is None)
        same_split = (m.get("holdout", 0), m.get("split", "all")) == (args.holdout, split) and \
            (args.class_name is None) == (m.get("class") is None)
        if {"protocol": "slct", **m.get("extractor", {})} != extractor.spec() or m.get("limit") != args.limit or not same_resolution \
                or not same_split:
            raise FileExistsError(f"{out} exists with other settings (see {out.with_suffix('.json')}); "
                                  "pass --force to overwrite or choose another --out")
        print(f"reference statistics already computed: {out} ({ref.n} images; --force recomputes)")
        return 0
    ref = compute_reference(args.source, extractor, resolution=args.resolution, resample=args.resample,
                            batch_size=args.batch_size, max_features=max_features, limit=args.limit,
                            progress=not args.no_progress, device=device, holdout=args.holdout, split=split,
                            class_name=args.class_name)
    path = save_reference(ref, out)
    res = f"{ref.manifest['resolution']} px" if ref.manifest["resolution"] else "native size"
    cls = f", class {ref.manifest['class']}" if ref.manifest.get("class") is not None else ""
    print(f"reference statistics of {ref.n} images ({extractor.name}, {res}{cls}) -> {path} "
          f"(+ {path.with_suffix('.json').name})")
    return 0


def _references(args) -> list:
    """The --ref files, loaded; --extractor (one reference only) overrides the recorded extractor."""
    from slct.eval.reference import load_reference

    if not args.ref:
        raise ValueError("--ref STATS.npz is required (make one with `slct eval ref SOURCE --extractor NAME`)")
    if args.extractor is not None and len(args.ref) > 1:
        raise ValueError("--extractor goes with a single --ref; with several, each reference's own extractor is used")
    refs = [load_reference(path) for path in args.ref]
    for path, ref in zip(args.ref, refs):
        if args.extractor is None and "extractor" not in ref.manifest:
            raise ValueError(f"{path} does not record its extractor (a pytorch-fid file?): pass --extractor")
    return refs


def _labels_for_references(labels, refs, paths, num_classes: int):
    """--labels, or the class the references were made of (`eval ref --class`); a disagreement is an error."""
    classes = {ref.manifest.get("class") for ref in refs}
    if classes == {None}:
        return labels
    if None in classes:
        raise ValueError("a class reference and an all-class reference cannot share one evaluation")
    if len(classes) > 1:
        raise ValueError(f"the references hold different classes ({', '.join(sorted(map(str, classes)))}); "
                         "evaluate one class per call")
    (cls,) = classes
    if labels is None:
        return [str(cls)]
    if [str(x) for x in labels] != [str(cls)]:
        raise ValueError(f"{paths[0]} holds the images of class {cls!r}; --labels {' '.join(map(str, labels))} would "
                         f"compare other classes with them (pass --labels {cls} or leave --labels out)")
    return labels


def run_eval(args) -> int:
    import importlib

    import torch

    from slct import __version__, distributed
    from slct.eval.evaluate import evaluate_many, format_table
    from slct.eval.extractors import file_sha256
    from slct.eval.reference import check_held_out, check_image_size, image_reader, image_sizes
    from slct.sampling import describe_labels

    if args.snapshot is None and args.images is None:
        raise ValueError("give --snapshot PATH or --images DIR (or use `slct eval ref SOURCE`)")
    for flag, value, low in (("--n", args.n, 2), ("--batch-size", args.batch_size, 1), ("--k", args.k, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    t0 = time.time()
    refs = _references(args)
    device = _device(args.device)
    dist = distributed.init(device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    pairs = [(_extractor(args, args.extractor or ref.manifest["extractor"]["name"], device,
                         ref.manifest.get("extractor")), ref) for ref in refs]
    protocols = sorted({extractor.protocol for extractor, _ in pairs})
    if len(protocols) > 1:
        raise ValueError(f"the references were made under different protocols ({', '.join(protocols)}); "
                         "evaluate each protocol in its own call")
    common = dict(k=args.k, max_pr_samples=args.max_pr_samples, progress=not args.no_progress)
    record: dict[str, Any] = dict(
        slct_version=__version__, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        arguments={k: v for k, v in vars(args).items() if not k.startswith("_")})

    if args.images is not None:
        count, read = image_reader(args.images, args.limit, loader=pairs[0][0].protocol)
        if count < 2:
            raise ValueError(f"need at least 2 generated images, found {count} in {args.images}")
        (size,) = image_sizes(read([0]))
        for path, ref in zip(args.ref, refs):
            check_image_size(ref.manifest, size, path, f"{args.images}")
        rows = [dict(source=Path(args.images).name, **result)
                for result in evaluate_many(read, count, args.batch_size, pairs, **common)]
        record.update(images=str(Path(args.images).resolve()), n=count)
        first = "source"
    else:
        if device.type == "cpu" and args.n >= 10_000 and dist.is_main and not args.no_progress:
            print(f"note: {args.n:,} samples per NFE on the CPU take long (the bar shows the estimate); --n 5000 "
                  "gives a quicker, noisier FD", file=sys.stderr)
        sampling = importlib.import_module("slct.sampling")  # the training system's snapshot API
        snap = sampling.load_snapshot(args.snapshot, device=device, **({} if args.ema is None else {"ema": args.ema}))
        for path, ref in zip(args.ref, refs):
            check_image_size(ref.manifest, snap.image_size, path, f"the model ({Path(args.snapshot).name})")
        overlaps = [check_held_out(getattr(snap, "data_source", None), ref.manifest, path)
                    for path, ref in zip(args.ref, refs)]
        info = snap.info()
        labels = _labels_for_references(args.labels, refs, args.ref, snap.num_classes)
        snap.labels([args.seed], labels)  # unknown labels or an unconditional model fail before any work
        snap.check_guidance(args.guidance)
        if args.solver is not None:
            sampling.set_solver(snap.config.sampling, snap.config.objective.kind, args.solver)
        nfes = args.nfe
        if nfes is None and hasattr(sampling, "default_nfe") and hasattr(snap, "config"):
            nfes = sampling.default_nfe(snap.config.objective, snap.config.sampling)
        nfes = list(nfes or [1, 2])
        rows = []
        for nfe in nfes:
            def generate(seeds: list[int], nfe: int = nfe) -> torch.Tensor:
                with torch.no_grad():
                    return snap.generate(seeds, nfe, snap.labels(seeds, labels), args.guidance)

            results = evaluate_many(generate, args.n, args.batch_size, pairs, seed=args.seed, **common)
            rows += [dict(nfe=nfe, **result) for result in results]
        snapshot_path = Path(info.get("path", args.snapshot))
        sha = info.get("sha256") or (file_sha256(snapshot_path) if snapshot_path.is_file() else None)
        record.update(snapshot=dict(path=str(snapshot_path.resolve()), sha256=sha, info=info),
                      codec=info.get("codec"), nfe=nfes, n=args.n,
                      seeds=dict(first=args.seed, last=args.seed + args.n - 1, rule="sample i uses seed first + i"),
                      world_size=dist.world_size, guidance=args.guidance,
                      labels=describe_labels(labels if labels is not None else ("balanced" if snap.num_classes
                                                                                else None)),
                      reference_images_in_training=overlaps)  # None: not the same source, cannot tell
        first = "nfe"

    record.update(
        extractors=[extractor.spec() for extractor, _ in pairs],
        references=[dict(path=str(Path(path).resolve()), sha256=file_sha256(path), manifest=ref.manifest)
                    for path, ref in zip(args.ref, refs)],
        k=args.k, max_pr_samples=args.max_pr_samples, results=rows, wall_time_s=round(time.time() - t0, 3))
    if dist.is_main:
        print(format_table(rows, first=first))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, default=str) + "\n")
            print(f"results -> {out}")
    distributed.shutdown()
    return 0
