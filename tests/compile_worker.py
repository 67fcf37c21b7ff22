"""Compiled against eager FSQ on one CPU kernel path (``python compile_worker.py``).

tests/test_compile.py runs this once per kernel path the machine offers, with
``ATEN_CPU_CAPABILITY`` set, so that eager ATen kernels and the inductor's
generated code both take that path. Each case is one training-mode forward and
backward of the same module state and input, eager and through ``torch.compile``,
with a fixed upstream gradient; it prints one JSON line per case with the largest
differences found. Inputs are drawn until no value before rounding lies within
``MARGIN`` of a rounding boundary: there, a last-bit difference between two
correct kernels may rightly flip a code, and the comparison would be a coin.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch._dynamo.utils import counters

from stabq import build_quantizer
from stabq.training.compiling import compile_module

MARGIN = 1e-3
BATCHES = (128, 100, 16, 7, 2, 1)  # rows packed 16, 4, 16, 1 and 2 at a time; 1: running stats


def pre_round(fsq, x: torch.Tensor) -> torch.Tensor:
    """The values the eager FSQ rounds, ``tanh(z + shift) * half_l - offset``, without side
    effects on the running statistics."""
    from stabq.quantizers.fsq import fsq_constants

    probe = copy.deepcopy(fsq)
    with torch.no_grad():
        z = probe._normalise(probe.project_in(x))
        shift, half_l, neg_offset, _, _ = fsq_constants(probe._levels)
        return torch.tanh(z + shift) * half_l + neg_offset


def clear_input(fsq, n: int, scale: float, seed: int) -> torch.Tensor:
    """The first input of ``n`` rows, from ``seed`` on, with every pre-rounding value at least
    ``MARGIN`` from a rounding boundary."""
    for attempt in range(1000):
        gen = torch.Generator().manual_seed(seed + attempt)
        x = torch.randn(n, fsq.dim, generator=gen) * scale
        b = pre_round(fsq, x)
        if ((b - b.floor() - 0.5).abs() > MARGIN).all():
            return x
    raise AssertionError("no input clear of the rounding boundaries")


def step(fsq, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training-mode forward and backward; what it computes and what it changes."""
    x = x.clone().requires_grad_(True)
    out = fsq(x)
    (out.quantized * upstream).sum().backward()
    found = {"quantized": out.quantized.detach(), "indices": out.indices, "x.grad": x.grad}
    found.update({f"{k}.grad": p.grad for k, p in fsq.named_parameters()})
    found.update({k: b for k, b in fsq.named_buffers() if b.is_floating_point()})
    return found


def compare(name: str, fsq, x: torch.Tensor) -> dict:
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    eager = copy.deepcopy(fsq).train()
    compiled = compile_module(copy.deepcopy(fsq).train())  # the trainer's way
    torch._dynamo.reset()
    counters.clear()
    want, got = step(eager, x, upstream), step(compiled, x, upstream)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    assert want.keys() == got.keys(), (want.keys(), got.keys())
    # gradients against the step's largest one: some are zero but for rounding noise (a
    # bias ahead of the batch norm, identical rows), where their own scale would be noise
    grads = max(float(t.abs().max()) for k, t in want.items() if k.endswith(".grad"))
    worst = {}
    for key, a in want.items():
        b = got[key]
        if key == "indices":
            worst[key] = int((a != b).sum())
            continue
        scale = grads if key.endswith(".grad") else float(a.abs().max()) if a.numel() else 1.0
        worst[key] = float((a - b).abs().max()) / max(scale, 1e-30) if a.numel() else 0.0
    finite = all(bool(torch.isfinite(t).all()) for t in got.values() if t.is_floating_point())
    return {
        "case": name,
        "rows": len(x),
        "graphs": graphs,
        "graph_breaks": breaks,
        "finite": finite,
        "relative": worst,
    }


def cases():
    """(name, module, input): the `fsq` preset fresh, after a large step, and `fsq-plain`
    saturated; batches of every packing; constant and huge inputs."""
    torch.manual_seed(0)
    fsq = build_quantizer("fsq", dim=16)
    for n in BATCHES:
        yield f"fsq fresh, {n} rows", fsq, clear_input(fsq, n, 1.0, seed=n)
    # The cases below reuse batch sizes compiled above (128 and 16 rows, packed as 64 and 32
    # were): the inductor's cache serves those graphs, where a new size is a new compile
    # (about 6 s of CPU each with a cold cache, a C++ build included); what they check is
    # the values, huge or identical rows.
    yield "fsq, inputs x 1e4", fsq, clear_input(fsq, 128, 1e4, seed=3)
    yield "fsq, every row the same", fsq, torch.full((16, 16), 0.7)
    grown = copy.deepcopy(fsq)
    with torch.no_grad():
        grown.project_in.weight.mul_(50.0)
        grown.project_out.weight.mul_(50.0)
    yield "fsq, projection x 50", grown, clear_input(grown, 128, 1.0, seed=5)
    torch.manual_seed(0)
    plain = build_quantizer("fsq-plain", dim=16)
    with torch.no_grad():
        plain.project_in.weight.mul_(100.0)  # tanh saturated: gradients near zero
    yield "fsq-plain saturated", plain, clear_input(plain, 128, 1.0, seed=7)


def main() -> None:
    torch.set_num_threads(1)
    path = torch.backends.cpu.get_cpu_capability()
    for name, fsq, x in cases():
        report = compare(name, fsq, x)
        print(json.dumps({"path": path, "asked": os.environ.get("ATEN_CPU_CAPABILITY"), **report}))


if __name__ == "__main__":
    main()
