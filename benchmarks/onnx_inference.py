"""Inference throughput of an exported model: onnxruntime against eager torch, per preset.

Each preset's default MLP classifier on mnist1d-shaped rows (40 features, 10 classes;
hidden 256, bottleneck 128), put in a realistic state by one training-mode pass over
2,048 rows (k-means codebooks, running statistics), is exported with ``stabq.export``
and timed the way a user runs each side: torch with the model in eval under
``torch.inference_mode()``, onnxruntime through an ``InferenceSession`` with default
options but one thread. Both sides run on one thread, alternating, median of the
repeats, at 1 row and 1,024 rows a call. Writes
``benchmarks/results/onnx-inference-cpu.json``.

    python benchmarks/onnx_inference.py [--repeats 30] [--exporter dynamo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stabq
from _measure import alternate, command_line, provenance

BATCHES = (1, 1024)
FEATURES, CLASSES = 40, 10


def _runtime(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _model(preset: str) -> stabq.BottleneckClassifier:
    torch.manual_seed(0)
    model = stabq.BottleneckClassifier(FEATURES, CLASSES, preset)
    with torch.no_grad():
        model.train()(torch.randn(2048, FEATURES))
    return model.eval()


def measure(preset: str, repeats: int, exporter: str, folder: str) -> list[dict]:
    """Median ms a call of each side, per batch size, for one preset."""
    model = _model(preset)
    path = str(stabq.export(model, os.path.join(folder, f"{preset}.onnx"), exporter=exporter))
    runtime = _runtime(path)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, FEATURES)
        feed = {"x": x.numpy()}

        def eager(x=x):
            with torch.inference_mode():
                return model(x)

        times = alternate(
            {"torch": eager, "onnxruntime": lambda feed=feed: runtime.run(None, feed)},
            repeats,
            "cpu",
        )
        rows.append({
            "preset": preset,
            "batch": batch,
            "torch_ms": times["torch"],
            "onnxruntime_ms": times["onnxruntime"],
            "speedup": times["torch"] / times["onnxruntime"],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    parser.add_argument("--presets", default=",".join(stabq.preset_names()))
    parser.add_argument("--out", default="benchmarks/results/onnx-inference-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            row
            for preset in args.presets.split(",")
            for row in measure(preset, args.repeats, args.exporter, folder)
        ]
    document = {
        **provenance(command_line(), threads=1),
        "repeats": args.repeats,
        "exporter": args.exporter,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
