"""The README's and docs' result tables, generated from committed results files.

A table lives in a Markdown file between ``<!-- table: NAME -->`` and ``<!-- /table -->``; this
script rewrites every such block from its results file, so no figure is copied by hand.

    python benchmarks/tables.py           # rewrite the blocks
    python benchmarks/tables.py --check   # exit 1 if a committed block differs (CI runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = ("README.md", "docs/merging.md")
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

KIND_COLUMNS = (
    ("full", "full experts"),
    ("frozen-head", "frozen-head experts"),
    ("frozen-head-small-lr", "frozen-head, lr / 10"),
    ("lora", "LoRA experts"),
)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def merge_table(results_dir: Path) -> str:
    """Average accuracy over the domains per method and expert kind, normalised in brackets."""
    results = _read(RESULTS / results_dir / "results.json")
    kinds = {
        "full": {k: v for k, v in results.items() if k not in dict(KIND_COLUMNS) and k != "run"}
    }
    kinds.update({k: results[k] for k, _ in KIND_COLUMNS[1:] if k in results})
    columns = [(k, title) for k, title in KIND_COLUMNS if k in kinds]
    own = []
    for kind, _ in columns:
        accs = kinds[kind]["experts"].values()
        own.append(f"{sum(accs) / len(accs):.1f}")
    rows = [["experts, each on its own domain", *own]]
    for method in kinds["full"]:
        if method == "experts":
            continue
        cells = []
        for kind, _ in columns:
            r = kinds[kind].get(method)
            cells.append(f"{r['average']:.1f} ({r['normalized']:.1f})" if r else "")
        rows.append([f"`{method}`", *cells])
    return _markdown(["method", *[title for _, title in columns]], rows)


def relative_steps_trial() -> str:
    """The validation scores behind DOGE's and WUDI's relative constants, and the picks."""
    record = _read(RESULTS / "merge" / "trials" / "relative-steps.json")
    kinds = [k for k, _ in KIND_COLUMNS]
    titles = dict(KIND_COLUMNS)
    rows = []
    for label, entry in record["candidates"].items():
        cells = [f"{entry['per_kind'][k]:.1f}" for k in kinds]
        rows.append([label, *cells, f"{entry['mean']:.2f}"])
    header = ["candidate", *[f"{titles[k]} (val)" for k in kinds], "mean"]
    picks = ", ".join(f"{k} = {v}" for k, v in record["pick"].items())
    text = _markdown(header, rows) + f"\nPicked on validation data: {picks}.\n"
    if "baseline_best" in record:
        best = ", ".join(f"{k} = {v}" for k, v in record["baseline_best"].items())
        text += f"Best of the same budget for the baselines (recorded, not adopted): {best}.\n"
    return text


def _demo() -> dict:
    return _read(RESULTS / "demo_quick.json")


def _short(domain: str) -> str:
    return domain.split("/")[-1]


def demo_quick_time() -> str:
    """The sentence that says how long the quick demo takes, from the measured runs."""
    d = _demo()
    walls = " and ".join(f"{r['wall_seconds']:.0f} s" for r in d["runs"])
    return (
        f"The quick demo takes **{d['wall_seconds']:.0f} s** on {d['cpu_count']} CPU cores from an "
        f"empty cache ({len(d['runs'])} runs on {d['date']}: {walls}; "
        "`benchmarks/results/demo_quick.md`).\n"
    )


def demo_quick_domains() -> str:
    d = _demo()
    acc = d["method_accuracy"]
    rows = [
        [
            _short(dom),
            f"{100 * d['base_linear_probe_accuracy'][dom]:.1f}",
            f"**{100 * acc['full'][dom]:.1f}**",
            f"{100 * d['mean_off_domain_accuracy'][dom]:.1f}",
            f"{100 * acc['lora'][dom]:.1f}",
            f"{100 * acc['losa'][dom]:.1f}",
        ]
        for dom in d["domains"]
    ]
    header = ["domain", "base linear probe %", "full expert % (own domain)"]
    header += ["expert on other domains, mean %", "LoRA r8 expert %", "LoSA expert %"]
    return _markdown(header, rows)


def demo_quick_matrix() -> str:
    d = _demo()
    names = [_short(x) for x in d["domains"]]
    rows = [
        [names[i], *(f"**{100 * v:.1f}**" if i == j else f"{100 * v:.1f}" for j, v in enumerate(r))]
        for i, r in enumerate(d["accuracy_matrix"])
    ]
    return _markdown(["trained on \\ tested on", *names], rows)


def demo_quick_efficiency() -> str:
    d = _demo()
    rows = []
    for method, costs in d["method_costs"].items():
        accs = d["method_accuracy"][method].values()
        rows.append(
            [
                method,
                f"{100 * sum(accs) / len(accs):.1f}",
                f"{costs['trainable_params']:,.0f}",
                f"{costs['train_seconds']:.1f}",
                f"{costs['infer_ms_per_image']:.3f}",
            ]
        )
    return _markdown(["method", "accuracy %", "trainable params", "train s", "infer ms/img"], rows)


def _part(stage: str) -> str:
    if stage.startswith(("base ", "pretrain ")):
        return "base (shipped with lorex, or pretrained)"
    if " expert " in stage:
        return "digit experts (16 trainings, data generation included)"
    if stage == "evaluation" or stage.startswith("merge "):
        return "evaluation and merging"
    if stage.startswith("re-ID"):
        return "re-ID adaptation (SAGE)"
    if stage.startswith("cross-modal"):
        return "cross-modal transfer"
    return "other"


def demo_quick_stages() -> str:
    """Each run's seconds per part of the demo, from its time per stage."""
    d = _demo()
    parts: dict[str, list[float]] = {}
    for i, run in enumerate(d["runs"]):
        for stage, seconds in run["stage_seconds"].items():
            parts.setdefault(_part(stage), [0.0] * len(d["runs"]))[i] += seconds
    rows = [[part, *(f"{v:.0f}" for v in values)] for part, values in parts.items()]
    rows.append(["wall time (start-up and report included)"])
    rows[-1] += [f"{r['wall_seconds']:.0f}" for r in d["runs"]]
    return _markdown(["part", *[f"run {i + 1}, s" for i in range(len(d["runs"]))]], rows)


def quick_benches() -> str:
    """Each quick bench's time once the quick demo's cache exists."""
    record = _read(RESULTS / "quick_benches.json")
    rows = [
        [f"`lorex bench {bench} --quick`", f"{r['seconds']:.0f}", f"`{r['results']}`"]
        for bench, r in record["benches"].items()
    ]
    text = _markdown(["bench", "seconds", "its results"], rows)
    return text + (
        f"\nMeasured on {record['date']}, {record['cpu_count']} CPU cores, each from a fresh "
        "output folder (`benchmarks/quick_benches.py`; what each quick run can show is in "
        "`benchmarks/results/quick_benches.md`).\n"
    )


def merge_vs_mergekit() -> str:
    """lorex and mergekit side by side on one Llama: each run's seconds and the peak RSS, from
    ``benchmarks/merge_vs_mergekit.py``'s summary."""
    summary = _read(RESULTS / "merge_vs_mergekit" / "summary.json")
    rows = {
        (r["tool"], r["method"]): [x for x in r["runs"] if x.get("rc") == 0]
        for r in summary["rows"]
    }

    def cell(runs: list[dict]) -> tuple[str, str]:
        if not runs:
            return "failed", "-"
        secs = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        return secs, f"{max(r['peak_rss_mib'] for r in runs):,.0f}"

    body = []
    shared = [m for (tool, m) in rows if tool == "mergekit"]
    for method in shared:
        mk_s, mk_rss = cell(rows[("mergekit", method)])
        lx_s, lx_rss = cell(rows.get(("lorex", method), []))
        body.append([f"`{method}`", lx_s, mk_s, lx_rss, mk_rss, ""])
    for (tool, method), runs in rows.items():
        if tool == "lorex" and method not in shared:
            secs, rss = cell(runs)
            steps = runs[0].get("steps_used", "") if runs else ""
            body.append([f"`{method}` (lorex only)", secs, "-", rss, "-", str(steps or "")])
    built = summary["built"]
    header = [
        "method",
        "lorex s (each run)",
        "mergekit s (each run)",
        "lorex peak RSS MiB",
        "mergekit peak RSS MiB",
        "solver steps",
    ]
    verdicts = []
    for method in shared:
        mk, lx = rows[("mergekit", method)], rows.get(("lorex", method), [])
        if not (mk and lx):
            continue
        lx_s, mk_s = [r["seconds"] for r in lx], [r["seconds"] for r in mk]
        time = (
            "faster in every run"
            if max(lx_s) < min(mk_s)
            else "slower in every run"
            if min(lx_s) > max(mk_s)
            else "level on time (the runs overlap)"
        )
        lx_rss, mk_rss = max(r["peak_rss_mib"] for r in lx), max(r["peak_rss_mib"] for r in mk)
        memory = "less" if lx_rss < mk_rss else "more"
        verdicts.append(f"`{method}`: lorex {time}, {memory} peak RSS")
    own = [runs for (tool, m), runs in rows.items() if tool == "lorex" and m not in shared]
    slowest = max((r["seconds"] for runs in own for r in runs), default=0.0)
    tail = (
        "\n"
        + "; ".join(verdicts)
        + (
            f". lorex's own methods: the slowest run took {slowest:.0f} s"
            f" ({'under' if slowest < 600 else 'over'} the 10-minute goal).\n"
        )
    )
    versions = summary["versions"]
    note = (
        f"Llama of {built['parameters']:,} parameters, {len(built['experts'])} experts, "
        f"{built['shape']['dtype']}; {summary['machine']['cpus']} CPUs; lorex "
        f"{versions.get('lorex', '?')}, mergekit {versions.get('mergekit', '?')}.\n\n"
    )
    return note + _markdown(header, body) + tail


TABLES: dict[str, Callable[[], str]] = {
    "quick-benches": quick_benches,
    "demo-quick-time": demo_quick_time,
    "demo-quick": demo_quick_domains,
    "demo-quick-matrix": demo_quick_matrix,
    "demo-quick-efficiency": demo_quick_efficiency,
    "demo-quick-stages": demo_quick_stages,
    "merge-quick": lambda: merge_table(Path("merge")),
    "merge-full": lambda: merge_table(Path("merge-full")),
    "merge-relative-steps": relative_steps_trial,
    "merge-vs-mergekit": merge_vs_mergekit,
}


def render(text: str, where: str) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table '{name}' (known: {', '.join(TABLES)})")
        return match.group(1) + TABLES[name]() + match.group(4)

    return BLOCK.sub(fill, text)


def stale_documents() -> list[str]:
    """The documents whose table blocks differ from what their results files give."""
    return [
        doc
        for doc in DOCUMENTS
        if render((ROOT / doc).read_text(encoding="utf-8"), doc)
        != (ROOT / doc).read_text(encoding="utf-8")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a block is out of date")
    args = parser.parse_args(argv)
    stale = stale_documents()
    if args.check:
        for doc in stale:
            print(f"{doc}: a table differs from its results file; run benchmarks/tables.py")
        return 1 if stale else 0
    for doc in stale:
        path = ROOT / doc
        tmp = path.with_suffix(".tmp")
        tmp.write_text(render(path.read_text(encoding="utf-8"), doc), encoding="utf-8")
        tmp.replace(path)
        print(f"rewrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
