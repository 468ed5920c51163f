"""Evaluation: feature extractors, FID/FD, precision/recall/density/coverage, reference statistics and
the 50k protocol behind ``slct eval`` (REFERENCE.md [10]; the protocol is documented in docs/evaluation.md).

>>> from slct.eval import get_extractor, evaluate
>>> extractor = get_extractor("inception")                       # or "vgg16", "mobilenetv2", "pixels"
>>> result = evaluate(snapshot_generate, n=50_000, batch_size=250, extractor=extractor,
...                   reference="celebahq-inception.npz")       # doctest: +SKIP
"""

from slct.eval.evaluate import (check_compatible, compare, evaluate, evaluate_folder, evaluate_many, format_table,
                                metric_label)
from slct.eval.extractors import (EXTRACTORS, PROTOCOLS, RESIZE_METHOD, RESIZE_POLICY, Extractor, get_extractor,
                                  prepare_images, to_uint8)
from slct.eval.metrics import FeatureStats, frechet_distance, kth_nearest_distances, precision_recall
from slct.eval.reference import (Reference, compute_reference, default_reference_path, load_reference,
                                 reference_from_images, save_reference)

__all__ = [
    "EXTRACTORS", "PROTOCOLS", "RESIZE_METHOD", "RESIZE_POLICY", "Extractor", "FeatureStats", "Reference", "check_compatible",
    "compare", "compute_reference", "default_reference_path", "evaluate", "evaluate_folder", "evaluate_many",
    "format_table",
    "frechet_distance", "get_extractor", "kth_nearest_distances", "load_reference", "metric_label",
    "precision_recall", "prepare_images", "reference_from_images", "save_reference", "to_uint8",
]
