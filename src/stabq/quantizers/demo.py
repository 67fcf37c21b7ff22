"""A first look at every quantizer on random data: ``python -m stabq.demo``.

Draws a Gaussian mixture (64 clusters in 128 dims), lets each preset see it
for a few training-mode batches (k-means init, EMA and dead-code updates; no
optimiser, no classifier), then reports in eval mode: code usage, perplexity,
relative quantization error and the time of one forward pass.
"""

from __future__ import annotations

import time

import torch

from stabq.health.usage import CodebookUsage
from stabq.quantizers.registry import build_quantizer, preset_names


def mixture(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """``n`` points around ``clusters`` random centres in ``dim`` dimensions."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen) * 3
    which = torch.randint(clusters, (n,), generator=gen)
    return centres[which] + torch.randn(n, dim, generator=gen)


def describe(name: str, data: torch.Tensor, steps: int = 5, batch: int = 1024) -> dict:
    """Warm ``name`` up on ``steps`` batches, then measure it on all of ``data``."""
    torch.manual_seed(0)
    q = build_quantizer(name, data.shape[-1])
    with torch.no_grad():
        for step in range(steps):
            q(data[step * batch : (step + 1) * batch])
        q.eval()
        start = time.perf_counter()
        quantized, indices, _ = q(data)
        elapsed = time.perf_counter() - start
    usage = CodebookUsage.for_quantizer(q)
    usage.update(indices)
    health = usage.compute()
    error = (quantized - data).square().sum() / data.square().sum()
    return {
        "preset": name,
        "type": type(q).__name__,
        "codes": f"{q.num_codebooks} x {q.codebook_size}" if q.codebook_size else "-",
        "indices": "x".join(map(str, indices.shape)),
        "usage": health["usage"],
        "perplexity": health["perplexity"],
        "rel_error": float(error),
        "ms": elapsed * 1e3,
    }


def main() -> None:
    data = mixture(8192, 128, clusters=64, seed=0)
    print(f"stabq quantizers on random data: {tuple(data.shape)}, 64 Gaussian clusters")
    print("usage and perplexity: per codebook, mean over codebooks; rel_error = |q - x|^2 / |x|^2")
    print("fsq and vq project to a few dims through untrained layers: their error needs training\n")
    header = f"{'preset':<10}{'type':<18}{'codes':<12}{'indices':<11}"
    print(header + f"{'usage':>7}{'perplexity':>12}{'rel_error':>11}{'ms':>8}")
    for name in preset_names():
        r = describe(name, data)
        print(
            f"{r['preset']:<10}{r['type']:<18}{r['codes']:<12}{r['indices']:<11}"
            f"{r['usage']:>7.3f}{r['perplexity']:>12.1f}{r['rel_error']:>11.4f}{r['ms']:>8.1f}"
        )


if __name__ == "__main__":
    main()
