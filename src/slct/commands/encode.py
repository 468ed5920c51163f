"""``slct encode SOURCE OUT_DIR``: images -> a latent dataset directory (resumable)."""

from __future__ import annotations

import argparse

from slct.codecs import CODECS

HELP = "encode a folder or .zip of images into a latent dataset (shards + manifest + statistics)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="image folder (recursive; jpg/png/webp) or .zip of images")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory; run again to resume an interrupted encode")
    p.add_argument("--codec", default="taef2", choices=sorted(CODECS), help="image <-> latent codec")
    p.add_argument("--resolution", type=int, default=64, help="center-crop and resize images to this side (px)")
    p.add_argument("--batch", type=int, default=64, help="images per codec call")
    p.add_argument("--hflip-copies", action="store_true", help="also store the latents of mirrored images")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def run(args: argparse.Namespace) -> int:
    from slct.codecs import get_codec
    from slct.data import encode_dataset

    codec = get_codec(args.codec, **codec_kwargs(args))
    manifest = encode_dataset(
        args.source, args.out_dir, codec, args.resolution, batch_size=args.batch, hflip_copies=args.hflip_copies,
        strict=args.strict, num_workers=args.workers, device=args.device, shard_size=args.shard_size,
        progress=not args.no_progress, labels=args.labels, limit=args.limit, dtype=args.dtype,
        holdout=args.holdout, split=args.split or ("train" if args.holdout else "all"),
        resample=args.resample, seed=args.seed)
    g = manifest["stats"]["global"]
    print(f"{manifest['count']} latents {tuple(manifest['latent_shape'])} ({manifest['codec_id']}, "
          f"{manifest['image_resolution']} px) in {len(manifest['shards'])} shard(s) -> {args.out_dir}")
    print(f"values: mean {g['mean']:.4f}  std {g['std']:.4f}  min {g['min']:.3f}  max {g['max']:.3f}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable image(s), listed in manifest.json; "
              f"first: {manifest['skipped'][0]['name']}: {manifest['skipped'][0]['reason']}")
    return 0
