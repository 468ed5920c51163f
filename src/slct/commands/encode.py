"""``slct encode SOURCE --out OUT_DIR`` (or ``SOURCE OUT_DIR``): images -> a latent dataset directory (resumable)."""

from __future__ import annotations

import argparse

from slct.codecs import CODECS
from slct.data.sources import ALPHA_BACKGROUNDS

HELP = "encode a folder or .zip of images into a latent dataset (shards + manifest + statistics)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="image folder (recursive; every raster format PIL reads: jpg, "
                   "png, webp, bmp, gif, tiff, ...) or .zip of images")
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?", default=None,
                   help="output directory (or --out); run again to resume an interrupted encode")
    p.add_argument("--out", dest="out_flag", metavar="OUT_DIR", default=None, help="the output directory, as a flag")
    p.add_argument("--codec", default="taef2", choices=sorted(c for c in CODECS if c != "outliers"),
                   help="image <-> latent codec")
    p.add_argument("--outliers", default=None, metavar="MODE:K",
                   help="make the codec's latents impulsive in a way its decoder inverts exactly (the paper's premise, "
                   "controlled): spike:K multiplies each image and channel's largest-magnitude element by K, tail:K "
                   "maps every element through sinh(a x) / a, a = ln K; K = 1 is the plain codec "
                   "(docs/data.md)")
    p.add_argument("--resolution", type=int, default=64, help="center-crop and resize images to this side (px)")
    p.add_argument("--batch", type=int, default=64, help="images per codec call")
    p.add_argument("--hflip-copies", action="store_true", help="also store the latents of mirrored images")
    p.add_argument("--strict", action="store_true", help="fail on unusable images instead of skipping them")
    p.add_argument("--alpha-background", default="white", choices=sorted(ALPHA_BACKGROUNDS),
                   help="what transparent pixels are composited on")
    p.add_argument("--min-size", type=int, default=None, metavar="PX",
                   help="skip images whose shorter side is below PX (0: keep all; None: --resolution / 4, i.e. "
                   "images upscaled more than 4x)")
    p.add_argument("--labels", default="none", choices=["none", "folder"],
                   help="'folder': label images by their class sub-folder (torchvision ImageFolder layout)")
    p.add_argument("--weights", metavar="DIR", default=None, help="taef2: folder with taef2_{en,de}coder.pth")
    p.add_argument("--vae", metavar="ID_OR_DIR", default=None,
                   help="sd-vae-*: hub id or local diffusers folder (None: stabilityai/<codec>)")
    p.add_argument("--posterior", default="sample", choices=["sample", "mean"],
                   help="sd-vae-*: store a posterior sample (the authors' choice) or its mean")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="identity: image channels")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="encode N images spread over the source")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="hold N images (spread evenly over the source) out of --split train, e.g. for `slct eval ref`")
    p.add_argument("--split", choices=["all", "train", "holdout"], default=None,
                   help="which images to encode (default: train when --holdout is given, else all)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding processes (None: min(4, cpus))")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--shard-size", type=int, default=4096, help="latents per shard file")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    p.add_argument("--resample", default="bicubic", choices=["bicubic", "lanczos", "bilinear", "box", "nearest"],
                   help="resize filter")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (sd-vae-*)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line every 30 s instead (logs, nohup)")


def codec_kwargs(args: argparse.Namespace) -> dict:
    """The codec-specific options of the command line, for ``get_codec(args.codec, **kwargs)``."""
    if args.codec == "taef2":
        return {"weights_dir": args.weights} if args.weights else {}
    if args.codec == "identity":
        return {"channels": args.channels}
    kwargs = {"posterior": args.posterior}
    if args.vae:
        kwargs["pretrained"] = args.vae
    return kwargs


def outlier_codec(codec, text: str):
    """``--outliers MODE:K`` around ``codec``."""
    from slct.codecs.outliers import OUTLIER_MODES, OutlierCodec

    mode, _, k = text.partition(":")
    try:
        strength = float(k)
    except ValueError:
        raise ValueError(f"--outliers takes MODE:K with MODE one of {', '.join(OUTLIER_MODES)} and K >= 1 "
                         f"(e.g. spike:20), got {text!r}") from None
    return OutlierCodec(codec, mode, strength)


def output_dir(args: argparse.Namespace) -> str:
    if args.out_dir and args.out_flag and args.out_dir != args.out_flag:
        raise ValueError(f"two output directories given ({args.out_dir} and --out {args.out_flag}); give one")
    out = args.out_flag or args.out_dir
    if not out:
        raise ValueError("no output directory: give it as --out DIR (or as the second argument)")
    return out


def run(args: argparse.Namespace) -> int:
    from slct.codecs import get_codec
    from slct.data import encode_dataset
    from slct.data.encode import format_counts

    out_dir = output_dir(args)
    if args.min_size is not None and args.min_size < 0:
        raise ValueError(f"--min-size must be >= 0, got {args.min_size}")
    codec = get_codec(args.codec, **codec_kwargs(args))
    if args.outliers:
        codec = outlier_codec(codec, args.outliers)
    manifest = encode_dataset(
        args.source, out_dir, codec, args.resolution, batch_size=args.batch, hflip_copies=args.hflip_copies,
        strict=args.strict, num_workers=args.workers, device=args.device, shard_size=args.shard_size,
        progress="lines" if args.no_progress else True, labels=args.labels, limit=args.limit, dtype=args.dtype,
        holdout=args.holdout, split=args.split or ("train" if args.holdout else "all"),
        resample=args.resample, seed=args.seed, alpha_background=args.alpha_background, min_size=args.min_size)
    g = manifest["stats"]["global"]
    print(f"{manifest['count']} latents {tuple(manifest['latent_shape'])} ({manifest['codec_id']}, "
          f"{manifest['image_resolution']} px) in {len(manifest['shards'])} shard(s) -> {out_dir}")
    print(f"values: mean {g['mean']:.4f}  std {g['std']:.4f}  min {g['min']:.3f}  max {g['max']:.3f}")
    skipped, converted = manifest["skipped"], manifest.get("converted", [])
    if skipped:
        first = skipped[0]
        print(f"skipped images: {format_counts(skipped)}, each listed in manifest.json; first: {first['name']}: "
              f"{first.get('detail', first['reason'])}")
    if converted:
        print(f"converted images: {format_counts(converted)}, each listed in manifest.json")
    ignored = manifest.get("ignored_files") or {}
    if ignored:
        print(f"ignored {sum(ignored.values())} file(s) that are not images: "
              + ", ".join(f"{ext} {n}" for ext, n in ignored.items()))
    return 0
