"""stabq on a GPU in one short run: against the CPU, against the peer, under bf16, under torchrun.

    python benchmarks/gpu_check.py [--device cuda] [--quick] [--data mnist1d]
                                   [--out gpu_check.json]

    timeout 300 python benchmarks/gpu_check.py --out gpu_check.json   # one call on a GPU

1. equivalence: each preset built on the CPU, copied to the device, given the same input;
   outputs, loss, gradient and state against the CPU's (bit for bit with ``--device cpu``).
2. timing: forward plus backward against vector-quantize-pytorch (median, synchronised).
3. bf16: one epoch of each preset's classifier trained with ``TrainConfig(precision="bf16-mixed")``.
4. distributed: ``torchrun --nproc_per_node=1 -m stabq train`` (started first, beside checks
   1 and 3, never beside the timing), and collectives in a 1-rank NCCL group (gloo on the
   CPU): at world size 1 stabq joins no process group, so these are what exercise NCCL.
5. compare: ``stabq compare`` (3 methods, 1 seed, 2 epochs) trained on the device, its test
   rows kept on the CPU; it must end with its report written.

Prints a table per check, saves the JSON after each (a run cut short keeps what it measured)
and exits with status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from functools import cache, partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's stabq
sys.path.insert(0, str(Path(__file__).parent))
import quantizers as bench
import stabq
from _measure import alternate, command_line, machine, markdown, provenance, save_report
from gpu_cli_runs import compare_run, start_smoke_run

ROOT = Path(__file__).resolve().parents[1]

DIM = 128  # BottleneckClassifier's default bottleneck_dim
MIN_AGREEMENT, ATOL, RTOL = 0.999, 1e-4, 1e-4
LOSS_ATOL = 1e-5  # aux losses can be small (0.004 for vq at init): ATOL alone would hide 2%
FIELDS = ("quantized", "indices", "loss")  # of a QuantizerOutput
NEW_PEERS: dict[str, Callable[[Any], torch.nn.Module]] = {  # as tests/test_<name>.py build them
    "simvq": lambda vqp: vqp.SimVQ(dim=DIM, codebook_size=1024, rotation_trick=False),
    "rfsq": lambda vqp: vqp.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4, dim=DIM),
    "lfq": lambda vqp: vqp.LFQ(dim=DIM, codebook_size=2**16, entropy_loss_weight=0.1),
    "bsq": lambda vqp: vqp.LFQ(
        dim=DIM, codebook_size=2**16, entropy_loss_weight=0.1, spherical=True
    ),
}
# bytes of the peer's (n, 2^16) LFQ code probabilities it may hold (several such at once)
PEER_PROBS_LIMIT = {"cpu": bench.PEER_DISTANCE_LIMIT, "cuda": 2**33}


# 1. equivalence --------------------------------------------------------------------------
def run_quantizer(q: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    """Eval-mode outputs, then a seeded training step's outputs, input gradient and state."""
    q.eval()
    with torch.no_grad():
        ev = q(x)
    q.train()
    torch.manual_seed(1)
    xx = x.detach().clone().requires_grad_()
    tr = q(xx)
    tensors, grads = [tr.quantized], [upstream]
    if tr.loss.requires_grad:
        tensors, grads = [*tensors, tr.loss], [*grads, torch.ones((), device=x.device)]
    torch.autograd.backward(tensors, grads)
    state = {k: v.detach().cpu() for k, v in q.state_dict().items() if v.is_floating_point()}
    parts = lambda out: {k: t.detach().cpu() for k, t in zip(FIELDS, out, strict=True)}  # noqa: E731
    return {"eval": parts(ev), "train": {**parts(tr), "grad": xx.grad.cpu(), "state": state}}


def close(a: torch.Tensor, b: torch.Tensor, exact: bool, atol: float = ATOL) -> tuple[bool, float]:
    """Whether ``a`` matches the reference ``b`` (bitwise, or within atol + RTOL * |b|), and
    the largest absolute difference."""
    if a.shape != b.shape:
        return False, float("inf")
    diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if exact:
        return torch.equal(a, b), diff
    return bool(torch.isclose(a, b, rtol=RTOL, atol=atol).all()), diff


def compare_outputs(got: dict, ref: dict, exact: bool, loss_only: bool = False) -> dict:
    """Figures and verdict of ``got`` against the reference ``ref`` (both as run_quantizer
    returns one mode); ``problems`` names what is off."""
    problems: list[str] = []
    ok, loss_diff = close(got["loss"], ref["loss"], exact, LOSS_ATOL)
    problems += [] if ok else [f"loss {float(got['loss']):.6g} vs {float(ref['loss']):.6g}"]
    figures: dict[str, Any] = {"loss": float(ref["loss"]), "loss_diff": loss_diff}
    if loss_only:
        return {**figures, "passed": not problems, "problems": problems, "compared": "loss"}
    same = got["indices"] == ref["indices"]
    rows = same.reshape(same.shape[0], -1).all(-1)
    agreement = float(rows.float().mean()) if rows.numel() else 1.0
    if agreement < (1.0 if exact else MIN_AGREEMENT):
        problems.append(f"indices agree on {agreement:.4%} of rows")
    figures["index_agreement"] = agreement
    for name in ("quantized", "grad"):
        if name in ref:
            ok, figures[f"{name}_diff"] = close(got[name][rows], ref[name][rows], exact)
            problems += [] if ok else [f"{name} differs by {figures[f'{name}_diff']:.3g}"]
    if "state" in ref and bool(rows.all()):
        diffs = [close(got["state"][k], v, exact) for k, v in ref["state"].items()]
        figures["state_diff"] = max((d for _, d in diffs), default=0.0)
        problems += [] if all(ok for ok, _ in diffs) else ["state after the step differs"]
    return {**figures, "passed": not problems, "problems": problems, "compared": "all"}


def equivalence(preset: str, device: torch.device, rows: int) -> dict:
    """One preset on ``device`` against the CPU.

    Built on the CPU (seed 0) and run once there in training mode (k-means initialisation
    happens on the CPU), then copied. Indices must agree on MIN_AGREEMENT of the rows (a
    near-tie may flip); ``quantized`` and the input gradient on those rows and, when every
    row agrees, the state after the step within ATOL + RTOL * |cpu|, the aux loss within
    LOSS_ATOL + RTOL * |cpu|. Gumbel's training noise comes from the device's generator:
    there its training step compares the loss alone.
    """
    torch.manual_seed(0)
    cpu = stabq.build_quantizer(preset, DIM).train()
    gen = torch.Generator().manual_seed(0)
    warm_up, x, upstream = (torch.randn(rows, DIM, generator=gen) for _ in range(3))
    with torch.no_grad():
        cpu(warm_up)  # k-means init and the first EMA update, on the CPU
    moved = copy.deepcopy(cpu).to(device)
    ref = run_quantizer(cpu, x, upstream)
    got = run_quantizer(moved, x.to(device), upstream.to(device))
    exact = device.type == "cpu"
    noisy = preset == "gumbel" and not exact  # its training noise: the device's generator
    modes = {
        "eval": compare_outputs(got["eval"], ref["eval"], exact),
        "train": compare_outputs(got["train"], ref["train"], exact, loss_only=noisy),
    }
    flat = {f"{mode}_{k}": v for mode, fig in modes.items() for k, v in fig.items()}
    flat["problems"] = [f"{m}: {p}" for m, fig in modes.items() for p in fig["problems"]]
    return {"preset": preset, "rows": rows, **flat, "passed": not flat["problems"]}


# 2. timing against the peer --------------------------------------------------------------
def timing_calls(device: torch.device, inputs: int | None, repeats: int) -> list[tuple]:
    """(label, call) per row: quantizers.py's correctness check on ``device`` (it must pass),
    then the median forward plus backward of ``repeats`` after warm-ups of stabq and the peer
    on quantizers.py's rows that have a peer (one a builder key at ``inputs``, when given),
    then on NEW_PEERS."""
    import vector_quantize_pytorch as vqp

    rows = [r for r in bench.ROWS if bench.build(replace(r, inputs=1), "peer", "cpu") is not None]
    if inputs is not None:  # one row a key, named by its new size
        rows = [replace(r, inputs=inputs, name=f"{r.key} {inputs}") for r in rows]
        rows = list({r.key: r for r in rows}.values())
    cases = [(r.name, r.inputs, r.dim, partial(bench.build, r, device=str(device))) for r in rows]
    n = 16384 if inputs is None else inputs
    for preset, make_peer in NEW_PEERS.items():
        fits = n * 2**16 * 4 <= PEER_PROBS_LIMIT[device.type] or preset not in ("lfq", "bsq")

        def build(side: str, preset=preset, make_peer=make_peer, fits=fits):
            if side == "stabq":
                return stabq.build_quantizer(preset, DIM).to(device).train()
            return make_peer(vqp).to(device).train() if fits else None

        cases.append((f"{preset} {n}", n, DIM, build))

    def correctness() -> dict:
        bench.check_correctness(str(device))  # an AssertionError fails this row
        return {"passed": True}

    def time_case(n: int, dim: int, build: Callable) -> dict:
        torch.manual_seed(0)
        x = torch.randn(n, dim).to(device)
        sides = {s: build(side=s) for s in ("stabq", "peer")}
        runs = {s: bench.step(m, x, s) for s, m in sides.items() if m is not None}
        medians = alternate(runs, repeats, device.type)
        row = {"inputs": n, **{f"{s}_ms": ms for s, ms in medians.items()}}
        if "peer_ms" in row:
            row["speedup"] = row["peer_ms"] / row["stabq_ms"]
        del sides, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the peer's LFQ rows held GiBs of code probabilities
        return row

    calls = [(name, partial(time_case, n, dim, build)) for name, n, dim, build in cases]
    return [("quantizers.py correctness check", correctness), *calls]


# 3. one bf16 epoch -----------------------------------------------------------------------
def bf16_epoch(
    preset: str, train: Any, test: Any, device: torch.device, max_rows: int | None = None
) -> dict:
    """One epoch of ``preset``'s classifier through ``stabq.train`` with
    ``TrainConfig(precision="bf16-mixed")`` (stabq's defaults otherwise: AdamW 3e-3, batch
    128, clip 1.0, the guards on). Fails on a non-finite loss or weight; test accuracy
    under bf16 and fp32, and the share of test inputs both give the same codes.
    ``max_rows``: train on the first rows alone."""
    from stabq.data import from_arrays

    torch.manual_seed(0)
    model = stabq.BottleneckClassifier(train.input_shape, train.num_classes, quantizer=preset)
    rows = from_arrays(train.x[:max_rows], train.y[:max_rows], classes=train.classes)
    config = stabq.TrainConfig(
        epochs=1, precision="bf16-mixed", device=str(device), progress=False, seed=0
    )
    result = stabq.train(model, rows, config=config)
    (row,) = result.history
    xt, yt = torch.from_numpy(test.x).to(device), torch.from_numpy(test.y).to(device)
    with torch.no_grad():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits16, out16 = model(xt)
        logits32, out32 = model(xt)
    same = (out16.indices == out32.indices).reshape(len(xt), -1).all(-1)
    finite = {
        "finite_loss": math.isfinite(row["train_loss"]) and math.isfinite(row["max_loss"]),
        "finite_weights": all(bool(p.isfinite().all()) for p in model.parameters()),
    }
    accuracy = lambda logits: float((logits.argmax(-1) == yt).float().mean())  # noqa: E731
    return {
        "preset": preset, "rows": len(rows), "logits_dtype": str(logits16.dtype)[6:],
        "train_loss": row["train_loss"], "max_loss": row["max_loss"],
        "guard_events": row["guard_events"], **finite,
        "accuracy_bf16": accuracy(logits16), "accuracy_fp32": accuracy(logits32),
        "codes_same_as_fp32": float(same.float().mean()), "passed": all(finite.values()),
    }  # fmt: skip


# 4. torchrun smoke run and collectives ---------------------------------------------------
def collectives(device: torch.device, workdir: Path) -> dict:
    """all_reduce, broadcast and all_gather of a tensor on ``device`` in a 1-rank group."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=(workdir / "store").resolve().as_uri(), rank=0, world_size=1,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        t, parts = torch.arange(1024.0, device=device), [torch.empty(1024, device=device)]
        dist.all_reduce(t)
        dist.broadcast(t, src=0)
        dist.all_gather(parts, t)
        ok = torch.equal(parts[0].cpu(), torch.arange(1024.0))  # .cpu() waits for the device
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "passed": ok}


# the run ---------------------------------------------------------------------------------
COLUMNS = {  # the printed tables: (key, format); the header is the key in words
    "equivalence": [
        ("preset", "{}"), ("eval_index_agreement", "{:.4f}"), ("eval_quantized_diff", "{:.2g}"),
        ("eval_loss_diff", "{:.2g}"), ("train_index_agreement", "{:.4f}"),
        ("train_grad_diff", "{:.2g}"), ("train_state_diff", "{:.2g}"), ("passed", "{}"),
    ],
    "timing": [
        ("name", "{}"), ("stabq_ms", "{:.2f}"), ("peer_ms", "{:.2f}"), ("speedup", "{:.2f}x"),
        ("passed", "{}"),
    ],
    "bf16": [
        ("preset", "{}"), ("train_loss", "{:.3f}"), ("max_loss", "{:.3f}"),
        ("guard_events", "{}"), ("accuracy_bf16", "{:.3f}"), ("accuracy_fp32", "{:.3f}"),
        ("codes_same_as_fp32", "{:.3f}"), ("passed", "{}"),
    ],
    "distributed": [("name", "{}"), ("passed", "{}")],
    "compare": [("name", "{}"), ("returncode", "{}"), ("seconds", "{:.1f}"), ("passed", "{}")],
}  # fmt: skip


def section(report: dict, name: str, out: str | None, calls: list[tuple]) -> None:
    """Run one check's ``(label, call)`` pairs into rows of ``report[name]``, saving after
    each; an exception fails its own row (``passed`` False) instead of ending the run."""
    start, rows = time.perf_counter(), report.setdefault(name, [])
    for label, call in calls:
        try:
            rows.append({"name": label, **call()})
        except Exception as err:
            rows.append({"name": label, "error": f"{type(err).__name__}: {err}", "passed": False})
        save(report, out)
    report["seconds"][name] = time.perf_counter() - start
    print(f"done {name} ({report['seconds'][name]:.1f} s)", file=sys.stderr, flush=True)
    save(report, out)


def save(report: dict, out: str | None) -> None:
    if out:
        save_report(report, out)


def failures(report: dict) -> list[str]:
    """One line per failed row of any check (empty when everything passed)."""
    return [
        f"{name} {row['name']}: "
        + ("; ".join(row.get("problems", [])) or row.get("error") or row.get("log_tail", ""))
        for name in COLUMNS
        for row in report.get(name, [])
        if row.get("passed") is False
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 repeats")
    parser.add_argument("--data", default="mnist1d", help="built-in data of checks 3 and 4")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    from stabq.data import load_data
    from stabq.training.devices import check_device

    try:
        device = check_device(args.device)
    except stabq.ConfigError as err:
        parser.error(str(err))
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs one
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_float32_matmul_precision("highest")  # no TF32: the CPU reference is fp32
    repeats, presets = (2 if args.quick else 7), stabq.preset_names()
    report: dict[str, Any] = {
        **provenance(command_line("gpu_check.py", argv)),
        "device": str(device), "machine": machine(device.type),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "stabq": stabq.__version__,
        "peer": version("vector-quantize-pytorch"), "quick": args.quick, "repeats": repeats,
        "tolerances": {
            "min_agreement": MIN_AGREEMENT, "atol": ATOL, "rtol": RTOL, "loss_atol": LOSS_ATOL,
        },
        "exact": device.type == "cpu", "seconds": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        smoke = start_smoke_run(device, args.data, Path(tmp))  # beside checks 1 and 3 only
        rows = 512 if args.quick else 8192
        section(report, "equivalence", args.out,
                [(p, partial(equivalence, p, device, rows)) for p in presets])  # fmt: skip
        data = cache(lambda: (load_data(args.data, "train"), load_data(args.data, "test")))

        def bf16(preset: str) -> dict:
            return bf16_epoch(preset, *data(), device, 1024 if args.quick else None)

        section(report, "bf16", args.out, [(p, partial(bf16, p)) for p in presets])
        section(report, "distributed", args.out, [
            ("torchrun stabq train", smoke),
            ("1-rank collectives", partial(collectives, device, Path(tmp))),
        ])  # fmt: skip
        run = partial(compare_run, device, args.data, Path(tmp))
        section(report, "compare", args.out, [("stabq compare", run)])
    section(report, "timing", args.out, timing_calls(device, 64 if args.quick else None, repeats))
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    save(report, args.out)
    print(f"\n{report['machine']}")
    for name, columns in COLUMNS.items():
        columns = [(key.replace("_", " "), key, fmt) for key, fmt in columns]
        print(f"\n{name}\n\n{markdown(report[name], columns)}")
    print("\n".join(["\nFAILED:", *report["failures"]] if report["failures"] else ["\nall passed"]))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
