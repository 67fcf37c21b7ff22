"""Speed tables: the quantizers against vector-quantize-pytorch (``benchmarks/quantizers.py``),
training throughput (``benchmarks/train.py``) and the trainer against a plain loop
(``benchmarks/loop_overhead.py``)."""

from __future__ import annotations

import statistics

from tablegen.common import load, num, sources, span, table

# (header, key, format) of the quantizer tables; a column no row has is left out
QUANTIZER_COLUMNS = (
    ("row", "name", "{}"),
    ("stabq ms", "stabq_ms", "{:.1f}"),
    ("peer ms", "peer_ms", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("user: stabq ms", "stabq_user_ms", "{:.1f}"),
    ("user: peer ms", "peer_user_ms", "{:.1f}"),
    ("user: speedup", "user_speedup", "{:.2f}x"),
    ("floor ms", "floor_ms", "{:.2f}"),
    ("stabq / floor", "floor_ratio", "{:.2f}x"),
    ("one product ms", "product_ms", "{:.2f}"),
    ("stabq / one product", "product_ratio", "{:.2f}x"),
    ("stabq MiB", "stabq_peak_mib", "{:.1f}"),
    ("peer MiB", "peer_peak_mib", "{:.1f}"),
)


def _floors(row: dict) -> dict:
    """A Gumbel row timed before its floor became the products of its step kept one product
    as its floor: shown as that product, its floor left blank."""
    if row.get("key", "").startswith("gumbel") and "product_ms" not in row and "floor_ms" in row:
        product = {"product_ms": row["floor_ms"], "product_ratio": row.get("floor_ratio")}
        return {**row, "floor_ms": None, "floor_ratio": None, **product}
    return row


def _quantizer_table(rows: list[dict]) -> str:
    rows = [_floors(row) for row in rows]
    columns = [c for c in QUANTIZER_COLUMNS if any(c[1] in row for row in rows)]
    body = [[num(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    return table([header for header, _, _ in columns], body)


def _ratios(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows if row.get(key) is not None]
    return span(values, "{:.2f}x") if values else "-"


def quantizers(stem: str) -> str:
    """Each row's step, stabq against the peer both ways, its floor and peak memory."""
    document = load(stem)
    rows = document["rows"]
    peered = [row for row in rows if row.get("peer_ms") is not None]
    summary = (
        f"Median of {document['repeats']} steps a cell. Peer time over stabq's: "
        f"{_ratios(rows, 'speedup')} with the fixed gradient"
    )
    if any("user_speedup" in row for row in rows):
        summary += f", {_ratios(rows, 'user_speedup')} user-style"
    summary += f", over the {len(peered)} rows the peer has.\n"
    return f"{_quantizer_table(rows)}\n{summary}\n{sources([stem])}"


def sweep(stem: str) -> str:
    """The size sweep a ``--sweep`` run holds."""
    document = load(stem)
    rows = document["sweep"]
    skipped = [row["name"] for row in rows if row.get("peer_ms") is None]
    summary = "Median of 3 steps a cell (the sweep's own count)."
    if skipped:
        summary += f" The peer is not run on {', '.join(skipped)}."
    return f"{_quantizer_table(rows)}\n{summary}\n\n{sources([stem])}"


def search_memory(stem: str) -> str:
    """The extra memory of one large nearest-code search, against its stated bound."""
    search = load(stem)["search_memory"]
    text = (
        f"Nearest-code search alone at {search['inputs']:,} inputs x {search['codes']:,} codes "
        f"x {search['dim']} dims: {search['search_ms']:.0f} ms and {search['extra_mib']:.1f} MiB "
        f"of extra memory (the rise of the peak resident set in a fresh process), against "
        f"the stated bound of {search['bound_mib']:.1f} MiB. The unchunked distance matrix "
        f"would need {search['unchunked_mib']:,.0f} MiB.\n"
    )
    return f"{text}\n{sources([stem])}"


def train(stem: str) -> str:
    """Samples a second per encoder and preset, against the continuous model."""
    document = load(stem)
    rows = [row for row in document["rows"] if not row.get("compiled")]
    body = [[row.get("encoder", "mlp"), f"`{row['preset']}`", f"{row['samples_per_s']:,.0f}",
             f"{row['slowdown']:.2f}x", num(row.get("peak_mib"), "{:.1f}")]
            for row in rows]  # fmt: skip
    header = ["encoder", "preset", "samples/s", "continuous / this", "peak MiB (1 epoch)"]
    lines = []
    for encoder in dict.fromkeys(row.get("encoder", "mlp") for row in rows):
        mine = [r for r in rows if r.get("encoder", "mlp") == encoder and r["preset"] != "none"]
        slowest = max(mine, key=lambda r: r["slowdown"])
        ratios = span([r["slowdown"] for r in mine], "{:.2f}x")
        lines.append(
            f"behind `{encoder}` a bottleneck takes {ratios} the continuous model's time per "
            f"sample (the slowest: `{slowest['preset']}`)"
        )
    summary = f"{document['data']}, {document['epochs']} epochs a run: {'; '.join(lines)}.\n"
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"


def train_compile(stem: str) -> str:
    """Each preset eager and with ``TrainConfig(compile=True)``, side by side."""
    document = load(stem)
    rows = document["rows"]
    eager = {r["preset"]: r for r in rows if not r["compiled"]}
    compiled = {r["preset"]: r for r in rows if r["compiled"]}
    body, ratios = [], []
    for preset, row in eager.items():
        other = compiled.get(preset)
        ratio = other["samples_per_s"] / row["samples_per_s"] if other else None
        ratios += [] if ratio is None else [100 * ratio]
        rate = None if other is None else other["samples_per_s"]
        body.append([f"`{preset}`", f"{row['samples_per_s']:,.0f}", num(rate, "{:,.0f}"),
                     num(ratio, "{:.2f}x")])  # fmt: skip
    header = ["preset", "eager samples/s", "compiled samples/s", "compiled / eager"]
    summary = (
        f"Compiled, the presets trained at {span(ratios, '{:.0f}%')} of their eager rate "
        f"(median {statistics.median(ratios):.0f}%).\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"


def loop_overhead(stems: list[str]) -> str:
    """``stabq.train`` against the plain loop per preset (``benchmarks/loop_overhead.py``);
    a second result, of the trainer before a change, adds its ratio beside."""
    document = load(stems[0])
    before = {r["preset"]: r for r in load(stems[1])["rows"]} if len(stems) > 1 else {}
    header = ["preset", "plain loop s", "stabq.train / plain", "guards off / plain",
              "quantized / continuous (plain)"]  # fmt: skip
    if before:
        header[3:3] = ["before: stabq.train / plain"]
        header.append("before: quantized / continuous")
    body = []
    for row in document["rows"]:
        cells = [
            f"`{row['preset']}`", f"{row['plain_cpu_s']:.3f}", f"{row['train_ratio']:.2f}x",
            f"{row['guards_off_ratio']:.2f}x", num(row.get("plain_vs_none"), "{:.2f}x"),
        ]  # fmt: skip
        if before:
            old = before.get(row["preset"])
            cells[3:3] = [num(old and old["train_ratio"], "{:.2f}x")]
            cells.append(num(old and old.get("plain_vs_none"), "{:.2f}x"))
        body.append(cells)
    ratios = [row["train_ratio"] for row in document["rows"]]
    summary = (
        f"{document['data']}, {document['epochs']} epochs a run, median of "
        f"{document['repeats']} alternated repeats; CPU seconds. `stabq.train` took "
        f"{span(ratios, '{:.2f}x')} the plain loop's time (median "
        f"{statistics.median(ratios):.2f}x)"
    )
    if before:
        old = [r["train_ratio"] for r in before.values()]
        median = statistics.median(old)
        summary += f"; before the change, {span(old, '{:.2f}x')} (median {median:.2f}x)"
    return f"{table(header, body)}\n{summary}.\n\n{sources(stems)}"
