"""Inference tables: an exported model under onnxruntime against eager torch
(``benchmarks/onnx_inference.py``)."""

from __future__ import annotations

from tablegen.common import load, sources, span, table


def onnx_inference(stem: str) -> str:
    """Milliseconds a call per preset and batch size, torch and onnxruntime side by side."""
    document = load(stem)
    rows = document["rows"]
    batches = sorted({row["batch"] for row in rows})
    header = ["preset"]
    for batch in batches:
        rows_text = "1 row" if batch == 1 else f"{batch:,} rows"
        header += [f"{rows_text}: torch ms", "onnxruntime ms", "speedup"]
    found = {(row["preset"], row["batch"]): row for row in rows}
    body = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        cells = [f"`{preset}`"]
        for batch in batches:
            row = found.get((preset, batch))
            if row is None:
                cells += ["-"] * 3
                continue
            cells += [f"{row['torch_ms']:.3f}", f"{row['onnxruntime_ms']:.3f}"]
            cells.append(f"{row['speedup']:.2f}x")
        body.append(cells)
    ranges = ", ".join(
        f"{span([r['speedup'] for r in rows if r['batch'] == b], '{:.2f}x')} at "
        f"{'1 row' if b == 1 else f'{b:,} rows'}"
        for b in batches
    )
    summary = (
        f"Median of {document['repeats']} calls a cell, the two sides alternated in one run "
        f"(exporter: {document['exporter']}). `speedup` is torch's time over onnxruntime's "
        f"(above one, onnxruntime is faster): {ranges}.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"
