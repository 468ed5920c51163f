"""The evaluation protocol: generate, extract features on the fly, compare with reference statistics.

REFERENCE.md [10]: FID on 50k samples against the training images; recall with k = 3. Sample i is
generated from seed ``seed + i`` alone, so results do not depend on the batch size or on the number of
processes. Under ``torchrun`` (an initialised ``torch.distributed``) rank r of W generates the seeds
``seed + r, seed + r + W, ...``; the feature moments are summed over ranks and precision/recall use the
features of the first ``max_pr_samples`` seeds, gathered in seed order. Several feature spaces (e.g.
Inception for FID and VGG16 for recall, the paper's pair) share one pass of generation. Nothing is
written to disk.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from slct.eval.extractors import DEFAULT_PROTOCOL, Extractor, Images
from slct.eval.metrics import FeatureStats, frechet_distance, precision_recall
from slct.eval.reference import Reference, image_reader, load_reference

GenerateFn = Callable[[list[int]], Images]


def metric_label(extractor_name: str) -> str:
    """What the Frechet distance is called in tables: FID only in Inception space."""
    return {"inception": "FID", "dinov2": "FD-DINOv2"}.get(extractor_name, f"FD-{extractor_name}")


def extractor_for_reference(reference: Reference, **kwargs: Any) -> Extractor:
    """The extractor a reference was computed with (its recorded name and options; weights looked up as usual)."""
    from slct.eval.extractors import EXTRACTORS, get_extractor

    spec = reference.manifest.get("extractor")
    if not spec or spec.get("name") not in EXTRACTORS:
        raise ValueError(f"reference {reference.path or ''} does not record a known extractor; recompute it with "
                         "`slct eval ref SOURCE --extractor NAME`")
    return get_extractor(spec["name"], **EXTRACTORS[spec["name"]].options_from_spec(spec), **kwargs)


def check_compatible(extractor: Extractor, reference: Reference) -> None:
    """Raise ValueError when ``reference`` was computed in another feature space than ``extractor``'s.

    The protocol (how images reach the network) is part of the feature space: a reference made under
    ``pytorch-fid`` is never compared with samples scored under ``slct`` (files from before protocols
    were recorded were made under ``slct``).
    """
    spec, ref_spec = extractor.spec(), reference.manifest.get("extractor")
    if ref_spec is None:  # a foreign file (e.g. pytorch-fid's): only the dimension can be checked
        if reference.mu.shape != (extractor.dim,):
            raise ValueError(f"reference {reference.path} has {reference.mu.shape[0]}-d features; extractor "
                             f"{extractor.name!r} gives {extractor.dim}-d")
        return
    ref_protocol = ref_spec.get("protocol", DEFAULT_PROTOCOL)
    if ref_protocol != extractor.protocol:
        raise ValueError(f"reference {reference.path or ''} was made under the protocol {ref_protocol!r} and these "
                         f"samples are scored under {extractor.protocol!r}; the two resize differently and their "
                         f"numbers are not comparable: use --protocol {ref_protocol} or recompute the reference "
                         f"with `slct eval ref SOURCE --protocol {extractor.protocol}`")
    differ = {k: (ref_spec.get(k), spec.get(k)) for k in ("name", "dim", "input_size", "channels", "resize", "model",
                                                          "weights_sha256") if ref_spec.get(k) != spec.get(k)}
    if differ:
        detail = ", ".join(f"{k}: reference {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"reference {reference.path or ''} was computed with another extractor ({detail}); "
                         "recompute it with `slct eval ref` or pick the matching --extractor")


def compare(stats: FeatureStats, fake_features: np.ndarray | None, reference: Reference, k: int = 3,
            chunk_size: int = 4096, extractor_name: str = "", protocol: str = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """Metrics of generated-feature moments (and a feature subset) against a reference.

    Returns ``label`` (FID or FD-<extractor>), ``protocol``, ``fd``, ``precision``, ``recall``, ``density``,
    ``coverage`` (None when the reference keeps no features or no fake features were kept), ``n``,
    ``n_pr_fake``, ``n_pr_real`` and ``k``.
    """
    result: dict[str, Any] = dict(label=metric_label(extractor_name), protocol=protocol,
                                  fd=frechet_distance(stats.mean, stats.cov, reference.mu, reference.sigma))
    pr_ok = fake_features is not None and reference.features is not None and \
        min(len(fake_features), len(reference.features)) > k
    pr = precision_recall(reference.features, fake_features, k=k, chunk_size=chunk_size) if pr_ok else {}
    for name in ("precision", "recall", "density", "coverage"):
        result[name] = pr.get(name)
    result.update(n=stats.n, n_pr_fake=len(fake_features) if pr_ok else 0,
                  n_pr_real=len(reference.features) if pr_ok else 0, k=k)
    return result


class _Scorer:
    """One feature space during a pass: streams moments, keeps the features of indices < max_pr_samples."""

    def __init__(self, extractor: Extractor, reference: Reference, max_pr_samples: int):
        check_compatible(extractor, reference)
        self.extractor, self.reference, self.max_pr_samples = extractor, reference, max_pr_samples
        self.stats = FeatureStats(extractor.dim)
        self.kept_index: list[np.ndarray] = []
        self.kept: list[np.ndarray] = []

    def add(self, images: Images, index: np.ndarray) -> None:
        feats = self.extractor(images)
        self.stats.update(feats)
        chosen = index < self.max_pr_samples
        if chosen.any():
            self.kept_index.append(index[chosen])
            self.kept.append(feats[chosen].astype(np.float32))

    def result(self, k: int, chunk_size: int) -> dict[str, Any]:
        from slct import distributed

        parts = distributed.gather_objects((self.stats, self.kept_index, self.kept))  # [own part] on one process
        stats = FeatureStats(self.extractor.dim)
        for part_stats, _, _ in parts:
            stats.merge(part_stats)
        index = [i for _, part_index, _ in parts for i in part_index]
        feats = [f for _, _, part_feats in parts for f in part_feats]
        fake = np.concatenate(feats)[np.argsort(np.concatenate(index), kind="stable")] if feats else None
        return compare(stats, fake, self.reference, k=k, chunk_size=chunk_size, extractor_name=self.extractor.name,
                       protocol=self.extractor.protocol)


def _rank_world() -> tuple[int, int]:
    from slct import distributed

    if not distributed.is_active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def evaluate_many(generate_fn: GenerateFn, n: int, batch_size: int,
                  pairs: Sequence[tuple[Extractor, Reference | str | os.PathLike]], seed: int = 0, k: int = 3,
                  max_pr_samples: int = 50_000, chunk_size: int = 4096, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`evaluate` in several feature spaces at once: each batch is generated once and fed to every
    extractor. ``pairs`` are (extractor, reference); returns one result dict per pair, in order."""
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_pr_samples < 0:
        raise ValueError(f"max_pr_samples must be >= 0, got {max_pr_samples!r}")
    if not pairs:
        raise ValueError("pairs must hold at least one (extractor, reference)")
    scorers = [_Scorer(ext, ref if isinstance(ref, Reference) else load_reference(ref), max_pr_samples)
               for ext, ref in pairs]
    rank, world = _rank_world()
    mine = np.arange(rank, n, world)  # sample indices of this process; sample i uses seed + i
    labels = ", ".join(metric_label(ext.name) for ext, _ in pairs)
    with tqdm(total=n, desc=f"evaluate ({labels})", unit="img", disable=not progress or rank != 0) as bar:
        for i in range(0, len(mine), batch_size):
            index = mine[i:i + batch_size]
            seeds = [seed + int(j) for j in index]
            images = generate_fn(seeds)
            if len(images) != len(seeds):
                raise RuntimeError(f"generate_fn returned {len(images)} images for {len(seeds)} seeds")
            for scorer in scorers:
                scorer.add(images, index)
            bar.update(min(len(seeds) * world, n - bar.n))
    return [scorer.result(k, chunk_size) | dict(seed=seed) for scorer in scorers]


def evaluate(generate_fn: GenerateFn, n: int, batch_size: int, extractor: Extractor,
             reference: Reference | str | os.PathLike, seed: int = 0, k: int = 3, max_pr_samples: int = 50_000,
             chunk_size: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Evaluate a generator on ``n`` samples (the paper: n = 50,000).

    Args:
        generate_fn: ``generate_fn(seeds: list[int]) -> images`` (len(seeds), C, H, W) in [-1, 1] (or any
            batch the extractors accept); image i must depend on ``seeds[i]`` only.
        n: number of samples; seeds are ``seed, ..., seed + n - 1``.
        batch_size: seeds per ``generate_fn`` call (per process).
        extractor: feature extractor (:func:`slct.eval.get_extractor`).
        reference: :class:`Reference` or a path to its ``.npz``, computed with the same extractor.
        k: neighbourhood size of precision/recall (3: the paper's recall).
        max_pr_samples: generated samples used by precision/recall (the first seeds); 0 disables them.
        chunk_size: distance block of the k-NN metrics.
    Returns:
        :func:`compare`'s dict plus ``seed``; identical on every rank.
    """
    return evaluate_many(generate_fn, n, batch_size, [(extractor, reference)], seed=seed, k=k,
                         max_pr_samples=max_pr_samples, chunk_size=chunk_size, progress=progress)[0]


def evaluate_folder(path: str | os.PathLike, extractor: Extractor, reference: Reference | str | os.PathLike,
                    batch_size: int = 64, k: int = 3, max_pr_samples: int = 50_000, limit: int | None = None,
                    chunk_size: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Evaluate a folder (or zip) of generated images, in sorted name order, by the same resize policy.

    Image i of the folder plays the role of sample i (also under torchrun); ``limit`` keeps the first ones.
    """
    count, read = image_reader(path, limit, loader=extractor.protocol)
    if count < 2:
        raise ValueError(f"need at least 2 generated images, found {count} in {path}")
    return evaluate_many(read, count, batch_size, [(extractor, reference)], k=k, max_pr_samples=max_pr_samples,
                         chunk_size=chunk_size, progress=progress)[0]


def format_table(rows: Sequence[dict[str, Any]], first: str = "nfe") -> str:
    """A plain-text table of result dicts (one row each; ``first`` is the leading column)."""
    cols = [first, "label", "protocol", "fd", "precision", "recall", "density", "coverage", "n"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[("metric" if c == "label" else c) for c in cols]] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
