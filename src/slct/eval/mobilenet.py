"""ImageNet MobileNetV2 features through LiteRT: the offline stand-in for Inception ("FD-MobileNetV2").

The network is the uint8-quantised ``mobilenet_v2_1.0_224_quant.tflite`` (google-coral test data,
Apache-2.0). Features are its 1280-d global average pool, the tensor ``MobilenetV2/Logits/AvgPool``,
dequantised to floats. Scores in this space are for comparing runs with each other; they are not
comparable to published FIDs.

``ai-edge-litert`` is an optional dependency: ``pip install "slct[eval]"``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

MOBILENET_V2_FILE = "mobilenet_v2_1.0_224_quant.tflite"
MOBILENET_V2_URL = f"https://github.com/google-coral/test_data/raw/master/{MOBILENET_V2_FILE}"
MOBILENET_V2_SHA256 = "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776"
FEATURE_TENSOR = "MobilenetV2/Logits/AvgPool"
INPUT_SIZE = 224
FEATURE_DIM = 1280


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:
        raise RuntimeError('the "mobilenetv2" extractor needs the optional package ai-edge-litert: '
                           'pip install "slct[eval]"') from e
    return Interpreter


class MobileNetV2Features:
    """``features(images)``: uint8 (N, 224, 224, 3) RGB -> float32 (N, 1280).

    The model's input is fixed at batch 1 (resizing it fails in the graph's final reshape), so
    images go through one at a time; about 30 ms each on one CPU thread.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        Interpreter = _interpreter_class()
        with warnings.catch_warnings():
            # reading an intermediate tensor needs preserve_all_tensors, which LiteRT flags as a debug option
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
            self.interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                                           num_threads=num_threads)
        self.interpreter.allocate_tensors()
        inp = self.interpreter.get_input_details()[0]
        if tuple(inp["shape"]) != (1, INPUT_SIZE, INPUT_SIZE, 3) or inp["dtype"] != np.uint8:
            raise ValueError(f"{path}: expected a uint8 1x{INPUT_SIZE}x{INPUT_SIZE}x3 input, "
                             f"got {inp['dtype'].__name__} {tuple(inp['shape'])}")
        self._input = inp["index"]
        by_name = {t["name"]: t for t in self.interpreter.get_tensor_details()}
        if FEATURE_TENSOR not in by_name:
            raise ValueError(f"{path} has no tensor {FEATURE_TENSOR!r}: is it MobileNetV2 1.0/224?")
        out = by_name[FEATURE_TENSOR]
        self._output = out["index"]
        scale, zero_point = out["quantization"]
        # (0, 0) marks an unquantised float tensor: read it as is
        self._scale, self._zero_point = (float(scale), int(zero_point)) if scale else (1.0, 0)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"images must be uint8 (N, {INPUT_SIZE}, {INPUT_SIZE}, 3), "
                             f"got {images.dtype} {images.shape}")
        out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float32)
        for i, image in enumerate(images):
            self.interpreter.set_tensor(self._input, np.ascontiguousarray(image[None]))
            self.interpreter.invoke()
            q = self.interpreter.get_tensor(self._output).reshape(FEATURE_DIM)
            out[i] = (q.astype(np.float32) - self._zero_point) * self._scale  # dequantise
        return out
