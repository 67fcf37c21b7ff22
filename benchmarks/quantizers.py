"""stabq's quantizers against vector-quantize-pytorch, side by side in one process.

    python benchmarks/quantizers.py [--repeats 7] [--device cpu|cuda] [--sweep] [--rows gumbel]
                                    [--json benchmarks/results/quantizers-userstyle-cpu.json]

Checks correctness before timing anything (stabq's FSQ indices equal the
peer's; the tiled nearest-code search equals brute force), then times forward
plus backward (EMA update included) of each row, two ways, all four steps
(stabq and peer, each way) alternated in one loop:

- fixed: the quantized output's gradient is a fixed random tensor and an
  auxiliary loss's is 1, so no loss arithmetic is timed beside the quantizer's;
- user: as a user's loop runs it, ``(quantized.sum() + aux_loss).backward()``
  (the peer: its tuple's first entry plus its aux or commitment loss, if any).

It prints the medians, each way's ratio peer / stabq, and the peak memory of
each side (fixed way, see ``_measure.py``). Each row's floor is timed in the
same run: the matrix products nearest-code search cannot avoid (VQ rows), one
elementwise pass over the input (grid rows: FSQ, iFSQ, FSP, residual FSQ, LFQ, BSQ), the
products of a Gumbel step (``gumbel_products``; ``product_ms``: one of them).
iFSQ and ReinMax have no peer: their rows time stabq alone. ``--sweep`` adds VQ-EMA
from 1,024 to 262,144 inputs and 256 to 65,536 codes, FSQ from 1,024 to 262,144 inputs,
and the memory of a 65,536-code search over 65,536 inputs (the peer is not run where its
full distance matrix would pass 1 GiB). ``--rows`` keeps the rows whose name contains
one of its comma-separated words.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import (
    alternate,
    command_line,
    elapsed_ms,
    machine,
    markdown,
    peak_mib,
    provenance,
    save_report,
)
from tablegen.speed import QUANTIZER_COLUMNS as COLUMNS  # the docs' tables show the same

LEVELS = [8, 8, 8, 5, 5, 5]
RFSQ_LEVELS = [8, 5, 5, 5]
GRID_KEYS = ("fsq", "fsq-pre", "ifsq", "fsp", "rfsq", "lfq", "bsq")  # floor: one elementwise pass
GUMBEL_KEYS = ("gumbel", "gumbel-reinmax")  # floor: the products of a step (gumbel_products)
# bytes of float32 distances the peer builds at once: its search holds several such
# matrices, and at 4 GiB (262,144 x 4,096) it was killed for memory on a 24 GB machine
PEER_DISTANCE_LIMIT = 2**30


@dataclass
class Row:
    name: str
    inputs: int
    key: str  # builder key, below
    codes: int = 1024  # codes per codebook (LFQ, BSQ: 2^bits)
    dim: int = 128

    @property
    def floor_products(self) -> list[tuple[int, int, int]]:
        """The (count, d, K) matrix products ``(n, d) @ (d, K)`` the row cannot avoid."""
        return {
            "rvq": [(4, self.dim, self.codes)],
            "vq": [(1, 32, self.codes)],
            "pq": [(8, self.dim // 8, self.codes)],
        }.get(self.key, [(1, self.dim, self.codes)])


ROWS = [
    Row("fsq 16k", 16384, "fsq", dim=6),
    Row("fsq 262k", 262144, "fsq", dim=6),
    # the `fsq` preset standardises z first (BatchNorm); the peer has no such option
    Row("fsq 16k, pre_norm (preset; peer without)", 16384, "fsq-pre", dim=6),
    Row("fsq 262k, pre_norm (preset; peer without)", 262144, "fsq-pre", dim=6),
    Row("vq-ema 1024x128", 16384, "vq-ema"),
    Row("vq repaired 512 (cosine, 32-d)", 16384, "vq", codes=512),
    Row("rvq 4x256x128", 16384, "rvq", codes=256),
    Row("vq-ema 1024x128, peer defaults", 16384, "vq-ema-peer-defaults"),
    Row("pq 8x256 over 128", 16384, "pq", codes=256),
    Row("gumbel 1024x128", 16384, "gumbel"),
    Row("simvq 1024x128", 16384, "simvq"),
    Row("rfsq 4x[8,5,5,5] over 128", 16384, "rfsq", codes=1000),
    Row("lfq 10 bits over 128", 16384, "lfq"),
    Row("bsq 10 bits over 128", 16384, "bsq"),
    # DiVeQ: a codebook learned by the directional gradient, dead codes replaced (both sides)
    Row("diveq 1024x128", 16384, "diveq"),
    Row("rvq-diveq 4x256x128", 16384, "rvq-diveq", codes=256),
    Row("fsp 262k", 262144, "fsp", dim=6),
    # iFSQ's bound and ReinMax: no library ships them; stabq's side alone
    Row("ifsq 262k (bound='distribution'; peer has none)", 262144, "ifsq", dim=6),
    Row("gumbel-reinmax 1024x128 (peer has none)", 16384, "gumbel-reinmax"),
]


def sweep_rows() -> list[Row]:
    rows = [Row(f"fsq {n}", n, "fsq", dim=6) for n in (1024, 16384, 262144)]
    for k in (256, 4096, 65536):
        for n in (1024, 16384, 262144):
            if n * k <= 2**32:  # 262,144 x 65,536 would take minutes a step on 2 cores
                rows.append(Row(f"vq-ema {n} x {k}", n, "vq-ema", codes=k))
    return rows


def build(row: Row, side: str, device: str) -> torch.nn.Module | None:
    """The module of one side of a row (None where the peer has no equivalent or would
    build a distance matrix over PEER_DISTANCE_LIMIT)."""
    import stabq

    k = row.codes
    if side == "stabq":
        module = {
            "fsq": lambda: stabq.FSQ(LEVELS),
            "fsq-pre": lambda: stabq.FSQ(LEVELS, pre_norm=True),
            "vq-ema": lambda: stabq.VectorQuantizer(row.dim, k),
            "vq-ema-peer-defaults": lambda: stabq.VectorQuantizer(row.dim, k),
            "vq": lambda: stabq.build_quantizer("vq", row.dim),
            "rvq": lambda: stabq.ResidualVQ(row.dim, 4, k),
            "pq": lambda: stabq.ProductQuantizer(row.dim, 8, k.bit_length() - 1),
            "gumbel": lambda: stabq.GumbelQuantizer(row.dim, k),
            "simvq": lambda: stabq.SimVQ(row.dim, k),
            "rfsq": lambda: stabq.ResidualFSQ(RFSQ_LEVELS, 4, dim=row.dim),
            "lfq": lambda: stabq.LFQ(row.dim, k.bit_length() - 1),
            "bsq": lambda: stabq.LFQ(row.dim, k.bit_length() - 1, spherical=True),
            "diveq": lambda: stabq.VectorQuantizer(
                row.dim, k, directional_reparam=True, dead_code_threshold=2.0
            ),
            "rvq-diveq": lambda: stabq.ResidualVQ(
                row.dim, 4, k, directional_reparam=True, dead_code_threshold=2.0
            ),
            "fsp": lambda: stabq.FSP(LEVELS),
            "ifsq": lambda: stabq.FSQ(LEVELS, bound="distribution"),
            "gumbel-reinmax": lambda: stabq.GumbelQuantizer(row.dim, k, estimator="reinmax"),
        }[row.key]()
        return module.to(device).train()
    # LFQ's peer scores all 2^bits codes per input: an (n, K) matrix like a distance one
    scores_every_code = row.key not in ("fsq", "fsq-pre", "fsp", "rfsq")
    if scores_every_code and row.inputs * k * 4 > PEER_DISTANCE_LIMIT:
        return None
    import vector_quantize_pytorch as vqp

    like = {"decay": 0.99, "rotation_trick": False}
    factory = {
        "fsq": lambda: vqp.FSQ(LEVELS),
        "fsq-pre": lambda: vqp.FSQ(LEVELS),
        "vq-ema": lambda: vqp.VectorQuantize(dim=row.dim, codebook_size=k, **like),
        "vq-ema-peer-defaults": lambda: vqp.VectorQuantize(dim=row.dim, codebook_size=k),
        "vq": lambda: vqp.VectorQuantize(
            dim=row.dim,
            codebook_size=k,
            codebook_dim=32,
            use_cosine_sim=True,
            kmeans_init=True,
            threshold_ema_dead_code=0.02,
            **like,
        ),
        "rvq": lambda: vqp.ResidualVQ(dim=row.dim, num_quantizers=4, codebook_size=k, **like),
        # as tests/test_simvq.py, test_rfsq.py and test_lfq.py build the oracles
        "simvq": lambda: vqp.SimVQ(dim=row.dim, codebook_size=k, rotation_trick=False),
        "rfsq": lambda: vqp.ResidualFSQ(levels=RFSQ_LEVELS, num_quantizers=4, dim=row.dim),
        "lfq": lambda: vqp.LFQ(dim=row.dim, codebook_size=k),
        "bsq": lambda: vqp.LFQ(dim=row.dim, codebook_size=k, spherical=True),
        # as tests/test_diveq.py and test_fsp.py build the oracles
        "diveq": lambda: vqp.VectorQuantize(
            dim=row.dim, codebook_size=k, directional_reparam=True, threshold_ema_dead_code=2
        ),
        "rvq-diveq": lambda: vqp.ResidualVQ(
            dim=row.dim, num_quantizers=4, codebook_size=k, diveq=True, threshold_ema_dead_code=2
        ),
        "fsp": lambda: vqp.FSP(LEVELS),
    }.get(row.key)
    return None if factory is None else factory().to(device).train()


def aux_loss(out: tuple) -> torch.Tensor | None:
    """The auxiliary (commitment, entropy) loss of a quantizer's output tuple, summed to
    0-dim; None where there is none (the peer's FSQ and ResidualFSQ return two entries)."""
    if len(out) > 2 and torch.is_tensor(out[2]) and out[2].is_floating_point():
        return out[2].sum()
    return None


def step(module: torch.nn.Module, x: torch.Tensor, side: str) -> Callable[[], None]:
    """One forward plus backward of ``module`` on ``x`` (the peer takes (1, n, dim)).

    The upstream gradient is a fixed random tensor (and 1 for an auxiliary loss), so
    no loss arithmetic is timed beside the quantizer's own.
    """
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)

    def run() -> None:
        xx = x.detach().requires_grad_()
        out = module(xx[None] if side == "peer" else xx)
        quantized = out[0][0] if side == "peer" else out[0]
        tensors, grads = [quantized], [upstream.to(quantized.dtype)]
        aux = aux_loss(out)
        if aux is not None and aux.requires_grad:
            tensors.append(aux)
            grads.append(torch.ones((), device=x.device))
        torch.autograd.backward(tensors, grads)

    return run


def user_step(module: torch.nn.Module, x: torch.Tensor, side: str) -> Callable[[], None]:
    """One step as a user's loop runs it: ``out = q(x); (out.quantized.sum() + aux).backward()``
    (the peer: the first entry of its tuple, on ``(1, n, dim)``, plus its aux loss if any)."""

    def run() -> None:
        xx = x.detach().requires_grad_()
        out = module(xx[None] if side == "peer" else xx)
        aux = aux_loss(out)
        loss = out[0].sum() if aux is None else out[0].sum() + aux
        loss.backward()

    return run


MODES = {"": step, "user_": user_step}  # result-key prefix -> step builder


def make_step(row: Row, side: str, device: str) -> Callable[[], None] | None:
    """A step of one side of a row on fresh data (for the peak-memory child)."""
    module = build(row, side, device)
    return (
        None if module is None else step(module, torch.randn(row.inputs, row.dim).to(device), side)
    )


def check_correctness(device: str) -> None:
    """Refuse to time anything unless the fast paths agree with references."""
    import vector_quantize_pytorch as vqp

    import stabq
    from stabq.quantizers.codebook import nearest_code

    gen = torch.Generator().manual_seed(0)
    for n in (4096, 4099):  # rows packed 16 at a time, and one at a time
        z = (torch.randn(n, 6, generator=gen) * 2).to(device)
        ours, peer = stabq.FSQ(LEVELS).to(device), vqp.FSQ(LEVELS).to(device)
        assert torch.equal(ours(z).indices, peer(z[None])[1][0].long()), "FSQ indices differ"
        assert torch.equal(ours(z).quantized, peer(z[None])[0][0]), "FSQ codes differ"
    x = torch.randn(3000, 32, generator=gen).to(device)
    codes = torch.randn(1, 700, 32, generator=gen).to(device)
    for chunk in (50_000, 2**20):
        found, _ = nearest_code(x[None], codes, chunk_elements=chunk)
        brute = torch.cdist(x.double(), codes[0].double()).argmin(dim=1)
        assert torch.equal(found[0], brute), "tiled nearest-code search differs from brute force"


def time_row(row: Row, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    x = torch.randn(row.inputs, row.dim, device=device)
    sides = {s: build(row, s, device) for s in ("stabq", "peer")}
    runs = {
        f"{side}_{mode}ms": make(module, x, side)
        for mode, make in MODES.items()
        for side, module in sides.items()
        if module is not None
    }
    if row.key in GUMBEL_KEYS:  # the floor alternated with the steps, under the same load
        runs["floor_ms"] = gumbel_products(row, device)
    result = {**asdict(row), **alternate(runs, repeats, device)}
    for mode in MODES:
        if f"peer_{mode}ms" in result:
            result[f"{mode}speedup"] = result[f"peer_{mode}ms"] / result[f"stabq_{mode}ms"]
    result.update(time_floor(row, device))
    for floor in ("floor", "product")[: 1 + ("product_ms" in result)]:
        result[f"{floor}_ratio"] = result["stabq_ms"] / result[f"{floor}_ms"]
    return result


def gumbel_products(row: Row, device: str) -> Callable[[], None]:
    """The products a Gumbel step cannot avoid: ``x W^T`` and ``Y E`` forward, backward
    ``G E^T``, ``Y^T G``, ``H W``, ``H^T x`` (``H`` the logits' gradient); ReinMax's one-hot
    mixture is a row lookup forward and an index-add backward: the four others alone."""
    rows = (row.inputs, row.inputs, row.codes, row.codes)
    x, g, w, e = (torch.randn(m, row.dim, device=device) for m in rows)  # w, e: (K, d)

    def run() -> None:
        logits = x @ w.t()
        if row.key == "gumbel":
            logits @ e, logits.t() @ g  # logits stand in for the mixture weights Y
        to_logits = g @ e.t()
        to_logits @ w, to_logits.t() @ x

    return run


def time_floor(row: Row, device: str) -> dict:
    """The row's floor in ms (``floor_ms``); for Gumbel rows, whose floor ``time_row``
    alternates with the steps, one product of the input with the logits' weights."""
    if row.key in GRID_KEYS:
        z = torch.randn(row.inputs, row.dim, device=device)
        return {"floor_ms": alternate({"f": lambda: torch.tanh(z)}, 9, device)["f"]}
    pairs = [
        (count, torch.randn(row.inputs, d, device=device), torch.randn(d, k, device=device))
        for count, d, k in row.floor_products
    ]
    runs = {f"p{i}": lambda a=a, c=c: a @ c for i, (_, a, c) in enumerate(pairs)}
    times = alternate(runs, 5, device)
    products = sum(count * times[f"p{i}"] for i, (count, _, _) in enumerate(pairs))
    return {"product_ms" if row.key in GUMBEL_KEYS else "floor_ms": products}


def make_search(n: int, k: int, d: int, device: str) -> Callable[[], None]:
    """Nearest-code search alone, ``n`` inputs against ``k`` codes (peak-memory child)."""
    from stabq.quantizers.codebook import nearest_code

    x, codes = torch.randn(1, n, d, device=device), torch.randn(1, k, d, device=device)
    return lambda: nearest_code(x, codes)


def search_memory(device: str, n: int = 65536, k: int = 65536, d: int = 128) -> dict:
    """Extra memory of one search next to its bound: two buffers of ``chunk_elements``
    float32 (a distance tile, and the squares or argmin temporaries beside it) plus
    O(n + k) results, running minima and norms."""
    from stabq.quantizers.codebook import DEFAULT_CHUNK_ELEMENTS, nearest_code

    bound = (2 * DEFAULT_CHUNK_ELEMENTS * 4 + n * (4 + 8 + 4 + 8 + 4) + k * 4) / 2**20
    x, codes = torch.randn(1, n, d, device=device), torch.randn(1, k, d, device=device)
    ms = elapsed_ms(lambda: nearest_code(x, codes), device)
    return {
        "inputs": n,
        "codes": k,
        "dim": d,
        "search_ms": ms,
        "extra_mib": peak_mib(make_search, n, k, d, device),
        "bound_mib": bound,
        "unchunked_mib": n * k * 4 / 2**20,
    }


def measure(rows: list[Row], repeats: int, device: str, memory: bool) -> list[dict]:
    results = []
    for row in rows:
        result = time_row(row, repeats, device)
        if memory:
            for side in ("stabq", "peer"):
                result[f"{side}_peak_mib"] = peak_mib(make_step, row, side, device)
        results.append(result)
        print(f"done {row.name}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--sweep", action="store_true", help="add the size sweep")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--rows",
        default=None,
        help="only the rows whose name contains one of these (comma-separated)",
    )
    args = parser.parse_args()
    check_correctness(args.device)
    peer = f"vector-quantize-pytorch {version('vector-quantize-pytorch')}"
    report: dict = {**provenance(command_line()), "machine": machine(args.device),
                    "peer": peer, "repeats": args.repeats}  # fmt: skip
    rows = ROWS
    if args.rows:
        rows = [row for row in ROWS if any(part in row.name for part in args.rows.split(","))]
    report["rows"] = measure(rows, args.repeats, args.device, not args.no_memory)
    print(f"\n{report['machine']}, median of {args.repeats}\n")
    print(markdown(report["rows"], COLUMNS))
    save(report, args.json)
    if args.sweep:
        report["sweep"] = measure(sweep_rows(), 3, args.device, False)
        print("\nsize sweep (median of 3)\n")
        print(markdown(report["sweep"], COLUMNS[:9]))
        report["search_memory"] = search = search_memory(args.device)
        print(
            f"\nsearch {search['inputs']} inputs x {search['codes']} codes x {search['dim']}: "
            f"{search['search_ms']:.0f} ms, {search['extra_mib']:.1f} MiB extra "
            f"(bound {search['bound_mib']:.1f} MiB; unchunked {search['unchunked_mib']:.0f} MiB)"
        )
    save(report, args.json)


def save(report: dict, path: str | None) -> None:
    """Write the results so far (the main table survives a sweep that fails)."""
    if path:
        save_report(report, path)


if __name__ == "__main__":
    main()
