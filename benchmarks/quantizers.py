"""stabq's quantizers against vector-quantize-pytorch, side by side in one process.

    python benchmarks/quantizers.py [--json out.json] [--repeats 7] [--device cpu|cuda]

Checks correctness before timing anything (stabq's FSQ indices equal the
peer's; the chunked nearest-code search equals brute force), then times
forward plus backward (EMA update included) of each row, stabq and peer
alternated, and prints the median, the ratio and the peak memory of each
side. Peak memory is measured in a fresh child process per row and side
(the increase of its peak resident set, or CUDA's max allocated). Floors:
the one matrix product nearest-code search cannot avoid (VQ rows) and one
elementwise pass (FSQ rows), timed in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

ROWS = {
    # name: (inputs, dim, builder key)
    "fsq 16k": (16384, 6, "fsq"),
    "fsq 262k": (262144, 6, "fsq"),
    "vq-ema 1024x128": (16384, 128, "vq-ema"),
    "vq repaired 512 (cosine, 32-d)": (16384, 128, "vq"),
    "rvq 4x256x128": (16384, 128, "rvq"),
    "vq-ema 1024x128, peer defaults": (16384, 128, "vq-ema-peer-defaults"),
    "pq 8x256 over 128": (16384, 128, "pq"),
    "gumbel 1024x128": (16384, 128, "gumbel"),
}


def build(key: str, side: str, device: str) -> torch.nn.Module | None:
    """The module of one side of a row (None where the peer has no equivalent)."""
    import stabq

    if side == "stabq":
        module = {
            "fsq": lambda: stabq.FSQ([8, 8, 8, 5, 5, 5]),
            "vq-ema": lambda: stabq.VectorQuantizer(128, 1024),
            "vq-ema-peer-defaults": lambda: stabq.VectorQuantizer(128, 1024),
            "vq": lambda: stabq.build_quantizer("vq", 128),
            "rvq": lambda: stabq.ResidualVQ(128, 4, 256),
            "pq": lambda: stabq.ProductQuantizer(128, 8, 8),
            "gumbel": lambda: stabq.GumbelQuantizer(128, 1024),
        }[key]()
        return module.to(device).train()
    import vector_quantize_pytorch as vqp

    like = {"decay": 0.99, "rotation_trick": False}
    factory = {
        "fsq": lambda: vqp.FSQ([8, 8, 8, 5, 5, 5]),
        "vq-ema": lambda: vqp.VectorQuantize(dim=128, codebook_size=1024, **like),
        "vq-ema-peer-defaults": lambda: vqp.VectorQuantize(dim=128, codebook_size=1024),
        "vq": lambda: vqp.VectorQuantize(
            dim=128,
            codebook_size=512,
            codebook_dim=32,
            use_cosine_sim=True,
            kmeans_init=True,
            threshold_ema_dead_code=0.02,
            **like,
        ),
        "rvq": lambda: vqp.ResidualVQ(dim=128, num_quantizers=4, codebook_size=256, **like),
    }.get(key)
    return None if factory is None else factory().to(device).train()


def step(module: torch.nn.Module, x: torch.Tensor, side: str) -> Callable[[], None]:
    """One forward plus backward of ``module`` on ``x`` (the peer takes (1, n, dim))."""

    def run() -> None:
        xx = x.detach().requires_grad_()
        out = module(xx[None] if side == "peer" else xx)
        loss = out[0].float().square().mean()
        if len(out) > 2 and torch.is_tensor(out[2]):
            loss = loss + out[2].sum()
        loss.backward()

    return run


def median_ms(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def check_correctness(device: str) -> None:
    """Refuse to time anything unless the fast paths agree with references."""
    import vector_quantize_pytorch as vqp

    import stabq
    from stabq.quantizers.codebook import nearest_code

    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(4096, 6, generator=gen) * 2).to(device)
    ours, peer = stabq.FSQ([8, 8, 8, 5, 5, 5]).to(device), vqp.FSQ([8, 8, 8, 5, 5, 5]).to(device)
    assert torch.equal(ours(z).indices, peer(z[None])[1][0].long()), "FSQ indices differ"
    x = torch.randn(3000, 32, generator=gen).to(device)
    codes = torch.randn(1, 700, 32, generator=gen).to(device)
    found, _ = nearest_code(x[None], codes, chunk_elements=50_000)
    brute = torch.cdist(x.double(), codes[0].double()).argmin(dim=1)
    assert torch.equal(found[0], brute), "chunked nearest-code search differs from brute force"


def time_row(name: str, repeats: int, device: str) -> dict:
    n, dim, key = ROWS[name]
    torch.manual_seed(0)
    x = torch.randn(n, dim, device=device)
    sides = {s: build(key, s, device) for s in ("stabq", "peer")}
    runs = {s: step(m, x, s) for s, m in sides.items() if m is not None}
    for fn in runs.values():  # warm-up (k-means init happens here)
        fn()
        fn()
    times: dict[str, list[float]] = {s: [] for s in runs}
    for _ in range(repeats):  # alternate the sides
        for side, fn in runs.items():
            times[side].append(median_ms(fn, device))
    row = {"row": name, "inputs": n, "dim": dim}
    for side, values in times.items():
        row[f"{side}_ms"] = statistics.median(values)
    if "peer_ms" in row:
        row["speedup"] = row["peer_ms"] / row["stabq_ms"]
    if key == "fsq":
        z = torch.randn(n, dim, device=device)
        row["floor_ms"] = statistics.median(
            median_ms(lambda: torch.tanh(z), device) for _ in range(9)
        )
    else:
        a, c = torch.randn(n, dim, device=device), torch.randn(1024, dim, device=device)
        row["floor_ms"] = statistics.median(median_ms(lambda: a @ c.T, device) for _ in range(9))
    return row


def _status_kib(field: str) -> int:
    """One ``/proc/self/status`` field in KiB (``VmHWM``: peak resident set, ``VmRSS``: now)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    """Restart VmHWM from the current resident set (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_child(name: str, side: str, device: str, queue: mp.Queue) -> None:
    n, dim, key = ROWS[name]
    module = build(key, side, device)
    if module is None:
        queue.put(None)
        return
    x = torch.randn(n, dim, device=device)
    run = step(module, x, side)
    run()  # warm-up: lazy initialisation (BLAS buffers, k-means) is not a per-step cost
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        queue.put((torch.cuda.max_memory_allocated() - before) / 2**20)
        return
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    run()
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_mib(name: str, side: str, device: str) -> float | None:
    """Peak extra memory (MiB) of one forward plus backward after a warm-up step, in a
    fresh process. On CPU glibc is told to map every block over 128 KiB on its own
    (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once
    and the peak resident set tracks the live tensors."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, side, device, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args()
    check_correctness(args.device)
    rows = []
    for name in ROWS:
        row = time_row(name, args.repeats, args.device)
        if not args.no_memory:
            for side in ("stabq", "peer"):
                row[f"{side}_peak_mib"] = peak_mib(name, side, args.device)
        rows.append(row)
        print(f"done {name}", flush=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    print(f"\n{args.device} ({where or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    print("| row | stabq ms | peer ms | speedup | floor ms | stabq MiB | peer MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:

        def f(key, fmt="{:.1f}", r=r):
            return "-" if r.get(key) is None else fmt.format(r[key])

        mib = "{:.0f}"
        print(
            f"| {r['row']} | {f('stabq_ms')} | {f('peer_ms')} | {f('speedup', '{:.2f}x')} "
            f"| {f('floor_ms')} | {f('stabq_peak_mib', mib)} | {f('peer_peak_mib', mib)} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
