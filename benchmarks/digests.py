"""Digests of what training produces, to show that a change of code layout changed no
behaviour: run before and after on the same machine and compare the two JSON files.

    python benchmarks/digests.py --out before.json
    python benchmarks/digests.py --out after.json && diff before.json after.json

For every preset with the MLP and the cnn1d encoders: the SHA-256 of the weights and buffers
after 2 epochs on mnist1d (seed 0, one thread); and the SHA-256 of one
``stabq compare --seeds 1 --epochs 2`` results.json with every time removed. Digests are
only comparable on one machine: another processor's kernels give other last bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's stabq
from stabq import BottleneckClassifier, TrainConfig, preset_names, train
from stabq.data import load_data

TIMES = ("seconds", "elapsed")  # keys whose values are wall times, left out of the digest


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def without_times(value: Any) -> Any:
    """``value`` with every time entry dropped, recursively."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def trained(preset: str, encoder: str, data: Any) -> str:
    torch.manual_seed(0)
    model = BottleneckClassifier(data.input_shape, data.num_classes, preset, encoder=encoder)
    train(model, data, config=TrainConfig(epochs=2, progress=False, device="cpu"))
    return weights_digest(model)


def compare_digest(workdir: Path) -> str:
    from stabq.cli import app

    out = workdir / "compare"
    argv = ["compare", "--seeds", "1", "--epochs", "2", "--quiet", "--out", str(out)]
    app(argv, standalone_mode=False)
    payload = json.loads((out / "results.json").read_text())
    text = json.dumps(without_times(payload), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("mnist1d", "train")
    report: dict[str, Any] = {"torch": torch.__version__, "weights": {}}
    for encoder in ("mlp", "cnn1d"):
        for preset in preset_names():
            report["weights"][f"{preset}/{encoder}"] = trained(preset, encoder, data)
            print(f"{preset}/{encoder} {report['weights'][f'{preset}/{encoder}']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["compare"] = compare_digest(Path(tmp))
    print(f"compare {report['compare']}")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
