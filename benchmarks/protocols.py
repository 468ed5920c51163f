"""How far apart the two FID protocols put the same real images (docs/evaluation.md).

    python benchmarks/protocols.py [--images 1000] [--zip ../shared/data/utkface-200px.zip]

For UTKFace faces at the training resolution (64 px, prepared as `slct encode` does) and as stored
(200 px), each protocol's 299 x 299 network input is built: ``slct`` (PIL bicubic on uint8) and
``pytorch-fid`` (bilinear in float inside the network). Reported: the mean absolute difference of the
two inputs (in [0, 1] units) and their PSNR; and, where the FID Inception weights can be found
(docs/evaluation.md: --weights, $SLCT_WEIGHTS, ../shared/weights, the torch hub cache), the FID between
the same images scored under the two protocols, which is how much the protocol alone moves an FID.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zip", default=str(REPO.parent / "shared" / "data" / "utkface-200px.zip"))
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--weights", default=None, help="FID Inception weights (else looked up; absent: inputs only)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "protocols-utkface"))
    a = p.parse_args()

    from slct.eval import get_extractor
    from slct.eval.metrics import FeatureStats, frechet_distance
    from slct.eval.reference import image_reader

    try:
        inception = {name: get_extractor("inception", weights=a.weights, device="cpu", protocol=name)
                     for name in ("slct", "pytorch-fid")}
    except FileNotFoundError as e:
        inception, missing = None, str(e).split(" (")[0]
    rows = []
    for resolution in (64, None):
        count, read = image_reader(a.zip, a.images, resolution)
        images = read(range(count))
        inputs = {name: get_extractor("pixels", size=299, protocol=name) for name in ("slct", "pytorch-fid")}
        diff, sq = 0.0, 0.0
        for i in range(0, count, 50):
            x, y = (inputs[name](images[i:i + 50]) for name in ("slct", "pytorch-fid"))
            diff += np.abs(x - y).mean(axis=1).sum()
            sq += ((x - y) ** 2).mean(axis=1).sum()
        row = dict(images=count, source_px=resolution or 200, mean_abs_diff=round(diff / count, 5),
                   psnr_db=round(float(10 * np.log10(1 / (sq / count))), 2))
        if inception:
            stats = {}
            for name, ext in inception.items():
                s = FeatureStats(ext.dim)
                for i in range(0, count, 50):
                    s.update(ext(images[i:i + 50]))
                stats[name] = s
            row["fid_between_protocols"] = round(float(frechet_distance(
                stats["slct"].mean, stats["slct"].cov, stats["pytorch-fid"].mean, stats["pytorch-fid"].cov)), 3)
        rows.append(row)
        print(row, flush=True)

    command = "python benchmarks/protocols.py " + " ".join(sys.argv[1:])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command=command.strip(), machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  rows=rows, inception=None if inception is None else inception["slct"].spec())
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The two FID protocols on the same real images (UTKFace)", "",
             f"- Command: `{result['command']}` ({result['date']})",
             f"- Machine: {result['machine']['cpu']}, torch {result['machine']['torch']}",
             "- Network input 299 x 299: `slct` = PIL bicubic on uint8; `pytorch-fid` = x / 255, bilinear in float "
             "(align_corners=False)", ""]
    lines += ["| source | images | mean abs difference of the inputs ([0, 1]) | PSNR (dB) | FID between protocols |",
              "|---|---:|---:|---:|---:|"]
    for r in rows:
        fid = r.get("fid_between_protocols", f"not measured ({missing})" if inception is None else "")
        lines.append(f"| {r['source_px']} px | {r['images']} | {r['mean_abs_diff']} | {r['psnr_db']} | {fid} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"-> {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
