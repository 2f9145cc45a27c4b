"""lorex merge against mergekit on a ~110M-parameter Llama with four experts: time and peak RSS.

For each shared method (task_arithmetic, ties and dare_ties at density 0.5) one mergekit YAML is
written and run by both tools, each in its own fresh subprocess (peak RSS is a lifetime high-water
mark), side by side in one run, the order alternating per repeat so both see the same machine
load. lorex's own methods (doge, wudi, tsv-m, iso-c, iso-cts) get lorex-only rows with the steps
their solver budget allowed (merge.json's ``steps_used``).

Results: one JSON per (tool, method) in ``--out``, written as each finishes; a rerun skips the
finished ones (so a killed run resumes), then ``summary.json`` and ``summary.md`` are rewritten.

    python benchmarks/merge_vs_mergekit.py                  # the full bench (long: minutes a row)
    python benchmarks/merge_vs_mergekit.py --quick --out /tmp/q   # a tiny Llama: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_llama_experts import FULL, QUICK, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "merge_vs_mergekit"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorex-bench"
SEED = 0
DENSITY = 0.5
#: The methods both tools have; both run the same YAML (``lorex merge --config`` maps it onto
#: lorex's options, docs/merging.md "Coming from mergekit").
SHARED = ("task_arithmetic", "ties", "dare_ties")
#: lorex's own methods, with the solver budgets that keep DOGE and WUDI to minutes on two cores
#: (docs/merging.md; by default they take the papers' full steps).
LOREX_ONLY = {
    "doge": ["--max-gflop", "1000"],
    "wudi": ["--max-gflop", "2000"],
    "tsv-m": [],
    "iso-c": [],
    "iso-cts": [],
}


def recipe(method: str, built: dict) -> dict:
    """mergekit's YAML for ``method`` over the built base and experts (weight 1 each)."""
    parameters = {"weight": 1.0} | ({"density": DENSITY} if method != "task_arithmetic" else {})
    return {
        "merge_method": method,
        "base_model": built["base"],
        "models": [{"model": e, "parameters": parameters} for e in built["experts"]],
        "dtype": built["shape"]["dtype"],
    }


def lorex_command(yaml_path: Path, out: Path) -> list[str]:
    """``lorex merge`` on the same YAML mergekit runs."""
    return [sys.executable, "-m", "lorex", "merge", "--config", str(yaml_path), "--out", str(out)]


def measured(command: list[str]) -> dict:
    """Wall time and the child's peak RSS, from a fresh wrapper process (``--child``)."""
    wrapper = [sys.executable, __file__, "--child", *command]
    done = subprocess.run(wrapper, capture_output=True, text=True)
    if done.returncode != 0:
        return {"rc": done.returncode, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(command: list[str]) -> None:
    """Run ``command``; print its wall time and peak RSS (ru_maxrss of the children: KiB)."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:] + done.stdout[-2000:])
        sys.exit(done.returncode)
    print(json.dumps({"rc": 0, "seconds": round(wall, 2), "peak_rss_mib": round(peak_mib, 1)}))


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("lorex", "torch", "transformers", "mergekit", "safetensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def row_file(out: Path, tool: str, method: str) -> Path:
    return out / f"{tool}__{method}.json"


def run_row(tool: str, method: str, command: list[str], work: Path, out_dir: Path) -> dict:
    """One timed merge into ``out_dir`` (removed afterwards); lorex rows add merge.json's
    solver record."""
    shutil.rmtree(out_dir, ignore_errors=True)
    result = measured(command)
    if result.get("rc") == 0 and tool == "lorex":
        made = json.loads((out_dir / "merge.json").read_text())
        for field in ("steps_used", "solver_gflop", "settings"):
            if field in made:
                result[field] = made[field]
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def save_row(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def plan(built: dict, work: Path) -> list[tuple[str, str, list[str]]]:
    """(tool, method, command) for every row, mergekit and lorex side by side."""
    rows = []
    for method in SHARED:
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, built), sort_keys=False))
        mk = [str(Path(sys.executable).parent / "mergekit-yaml"), str(path), str(work / "out")]
        rows.append(("mergekit", method, mk + ["--random-seed", str(SEED)]))
        rows.append(("lorex", method, lorex_command(path, work / "out")))
    for name, flags in LOREX_ONLY.items():
        sources = ["--base", built["base"], "--experts", *built["experts"]]
        lx = [sys.executable, "-m", "lorex", "merge", "--method", name, *sources, *flags]
        rows.append(("lorex", name, lx + ["--out", str(work / "out")]))
    return rows


def summary(out: Path, context: dict) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*__*.json"))]
    lines = [
        f"Llama of {context['built']['parameters']:,} parameters, "
        f"{len(context['built']['experts'])} experts, {context['built']['shape']['dtype']}; "
        f"{context['machine']['cpus']} CPUs; {context['repeats']} runs each.",
        "",
        "| method | tool | seconds (each run) | peak RSS MiB (max) | steps used |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ok = [r for r in row["runs"] if r.get("rc") == 0]
        secs = ", ".join(f"{r['seconds']:.1f}" for r in ok) or "failed"
        rss = f"{max(r['peak_rss_mib'] for r in ok):.0f}" if ok else "-"
        steps = ok[0].get("steps_used", "") if ok else ""
        lines.append(f"| {row['method']} | {row['tool']} | {secs} | {rss} | {steps} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    save_row(out / "summary.json", {**context, "rows": rows})


def finished(path: Path) -> bool:
    """A row is done when its file holds runs that all succeeded (a failed one is run again)."""
    return path.is_file() and all(r.get("rc") == 0 for r in json.loads(path.read_text())["runs"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the wrapper that measures one command
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built models")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny Llama (smoke test)")
    parser.add_argument("--only", nargs="+", help="only these methods (mergekit or lorex names)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    built = build(shape, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "_work"
    work.mkdir(exist_ok=True)
    context = {
        "built": built,
        "seed": SEED,
        "density": DENSITY,
        "repeats": args.repeats,
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    rows = plan(built, work)
    if args.only:
        rows = [r for r in rows if r[1] in args.only]
    todo = [r for r in rows if not finished(row_file(args.out, r[0], r[1]))]
    runs: dict[tuple[str, str], list[dict]] = {(t, m): [] for t, m, _ in todo}
    bar = tqdm(total=len(todo) * args.repeats, desc="merge_vs_mergekit", unit="run")
    for repeat in range(args.repeats):
        # side by side: a method's two tools run back to back, the first one alternating
        by_method: dict[str, list] = {}
        for row in todo:
            by_method.setdefault(row[1], []).append(row)
        for i, group in enumerate(by_method.values()):
            for tool, method, command in group if (repeat + i) % 2 == 0 else group[::-1]:
                bar.set_postfix_str(f"{tool} {method}")
                runs[(tool, method)].append(run_row(tool, method, command, work, work / "out"))
                bar.update()
                if len(runs[(tool, method)]) == args.repeats:
                    record = {"tool": tool, "method": method, "command": command}
                    record |= {"runs": runs[(tool, method)], **context}
                    save_row(row_file(args.out, tool, method), record)
    bar.close()
    shutil.rmtree(work, ignore_errors=True)
    summary(args.out, context)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
