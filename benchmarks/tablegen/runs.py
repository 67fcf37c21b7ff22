"""Tables of runs: the guard under attack, larger than memory, distributed, and the spread
over CPU kernel paths."""

from __future__ import annotations

import statistics

from tablegen.common import load, num, pct, provenance_of, sources, span, table


def attacks(stem: str) -> str:
    """Per preset and attack: the median test accuracy of the runs that finished, how many
    stopped with a TrainingError, and the guard events of a run."""
    document = load(stem)
    runs = document["runs"]
    names = list(dict.fromkeys(r["attack"] for r in runs))
    cells: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        cells.setdefault((run["preset"], run["attack"]), []).append(run)
    accuracy, events = [], []
    for preset in dict.fromkeys(r["preset"] for r in runs):
        acc_row, event_row = [f"`{preset}`"], [f"`{preset}`"]
        for attack in names:
            mine = cells[preset, attack]
            done = [r for r in mine if r["accuracy"] is not None]
            stopped = len(mine) - len(done)
            median = pct(statistics.median(r["accuracy"] for r in done)) if done else "-"
            acc_row.append(median + (f" ({stopped} of {len(mine)} stopped)" if stopped else ""))
            event_row.append(span([r["events"] for r in done], "{}") if done else "-")
        accuracy.append(acc_row)
        events.append(event_row)
    sizes = {len(v) for v in cells.values()}
    paths = ", ".join(dict.fromkeys(r["path"] for r in runs))
    seeds = len({r["seed"] for r in runs})
    summary = (
        f"{seeds} seeds on the {paths} kernel paths: {span(sizes, '{}')} runs a cell. A run "
        f"that ended in a `TrainingError` counts as stopped; the accuracies are those of the "
        f"runs that finished.\n"
    )
    header = ["preset", *names]
    return (
        f"Median test accuracy (%):\n\n{table(header, accuracy)}\n"
        f"Guard events a run (lowest to highest, runs that finished):\n\n"
        f"{table(header, events)}\n{summary}\n{sources([stem])}"
    )


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB"


def bigdata(stems: list[str]) -> str:
    """Each file size and row width: the memory limit, how the run ended, its peaks."""
    body, ratios = [], []
    for stem in stems:
        commit = provenance_of(load(stem)).get("commit", "-")
        for r in load(stem)["results"]:
            ended = "trained" if r["exit_code"] == 0 else f"killed (exit {r['exit_code']})"
            if r["exit_code"] == 0:
                ratios.append(r["file_mib"] / r["limit_mib"])
            body.append([
                _gib(r["file_mib"]), f"{r['rows']:,} x {r['features']}", f"{r['limit_mib']} MiB",
                ended, f"{r['peak_rss_mib']:.0f} MiB", f"{r['cgroup_max_usage_mib']} MiB",
                r["cgroup_failcnt"], f"{r['seconds']:.0f} s",
                num(r.get("val_accuracy"), "{:.3f}"), f"`{commit}`",
            ])  # fmt: skip
    header = ["file", "rows x features", "memory limit", "run", "peak resident (VmHWM)",
              "cgroup peak", "cgroup failcnt", "time", "val accuracy", "commit"]  # fmt: skip
    summary = (
        f"The largest file that trained is {max(ratios):.1f} times its memory limit.\n"
        if ratios
        else ""
    )
    return f"{table(header, body)}\n{summary}\n{sources(stems)}"


def memory_copies(stem: str) -> str:
    """Per source tree: the peak of a run on arrays in memory, above the process's base,
    as copies of the features held."""
    document = load(stem)
    body = [
        [f"`{r['tree']}`", f"{r['base_rss_mib']:.0f} MiB", f"{r['peak_rss_mib']:.0f} MiB",
         f"{r['above_base_mib']:.0f} MiB", f"{r['copies']:.2f}", r["fsq_row"].split()[1]]
        for r in document["results"]
    ]  # fmt: skip
    header = ["source", "base peak (small files)", "peak", "above the base",
              "copies of the features", "fsq test accuracy %"]  # fmt: skip
    first, last = document["results"][0], document["results"][-1]
    summary = (
        f"`stabq compare --methods fsq --seeds 1 --epochs {document['epochs']}` on "
        f"{document['rows']:,} x {document['features']} float32 rows and a test file of "
        f"{document['test_rows']:,}: {document['data_mib']:.0f} MiB of features; held once, "
        f"they are 1 copy. The base is the same command on files of {document['base_rows']:,} "
        f"rows. Above its base the run held {first['copies']:.2f} copies with `{first['tree']}`"
        f" and {last['copies']:.2f} with `{last['tree']}`.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"


def distributed(stems: list[str]) -> str:
    """The same training on 1 and on 2 processes, per global batch."""
    body, lines = [], []
    for stem in stems:
        document = load(stem)
        by = {row["processes"]: row for row in document["rows"]}
        one, two = by[1], by[2]
        speedup = one["train_s"] / two["train_s"]
        body.append([document["batch_size"], document["epochs"], f"{one['train_s']:.1f}",
                     f"{two['train_s']:.1f}", f"{speedup:.2f}x", f"{one['wall_s']:.1f}",
                     f"{two['wall_s']:.1f}"])  # fmt: skip
        faster = "faster" if speedup > 1 else "slower"
        lines.append(f"at a global batch of {document['batch_size']} two processes train "
                     f"{faster} than one ({speedup:.2f}x)")  # fmt: skip
    document = load(stems[0])
    header = ["global batch", "epochs", "1 process: training s", "2 processes: training s",
              "speedup (training)", "1 process: wall s", "2 processes: wall s"]  # fmt: skip
    summary = (
        f"`{document['data']}`, the `{document['quantizer']}` preset, median of "
        f"{document['repeats']} runs each: {'; '.join(lines)}.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources(stems)}"


def presets_paths(stem: str) -> str:
    """Every preset over seeds and kernel paths: mean, lowest, gap to ``none`` per run."""
    document = load(stem)
    rows = document["presets"]
    none = {(r["path"], r["seed"]): r["accuracy"] for row in rows if row["preset"] == "none"
            for r in row["runs"]}  # fmt: skip
    body = []
    for row in rows:
        accs = [r["accuracy"] for r in row["runs"]]
        gaps = [100 * (r["accuracy"] - none[r["path"], r["seed"]]) for r in row["runs"]]
        body.append([
            f"`{row['preset']}`", f"{pct(statistics.mean(accs))} ± {pct(statistics.stdev(accs))}",
            pct(min(accs)), "-" if row["preset"] == "none" else span(gaps, "{:+.1f}"),
        ])  # fmt: skip
    runs = len(rows[0]["runs"])
    paths = ", ".join(dict.fromkeys(r["path"] for r in rows[0]["runs"]))
    header = ["preset", f"test accuracy % ({runs} runs)", "lowest", "gap to `none`, same path "
              "and seed"]  # fmt: skip
    summary = (
        f"`{document['data']}`, {document['epochs']} epochs, {document['seeds']} seeds on each "
        f"of the {paths} kernel paths; ± is the standard deviation over all {runs} runs.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources([stem])}"


def fsq_paths(stems: list[str]) -> str:
    """FSQ's tanh and sigmoid forms by size, one column per kernel path."""
    documents = [load(stem) for stem in stems]
    header = ["rows", "elements"]
    header += [f"{d['cpu_capability']}: tanh / sigmoid (form picked)" for d in documents]
    body = []
    for i, row in enumerate(documents[0]["rows"]):
        cells = [f"{row['rows']:,}", f"{row['elements']:,}"]
        for document in documents:
            other = document["rows"][i]
            assert other["rows"] == row["rows"], "the kernel paths' sizes differ"
            cells.append(f"{other['speedup']:.2f}x ({other['picked']})")
        body.append(cells)
    repeats = span([d["repeats"] for d in documents], "{}")
    summary = (
        f"tanh / sigmoid above 1 means the sigmoid form is faster. Median of {repeats} steps "
        f"a cell, the two forms alternated in one process.\n"
    )
    return f"{table(header, body)}\n{summary}\n{sources(stems)}"
