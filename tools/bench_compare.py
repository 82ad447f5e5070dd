"""Regression gate: fail when a benchmark got slower by more than a factor, twice.

    python tools/bench_compare.py --factor 1.4 [--bench REGEX] [--rounds 4] BASE HEAD

Runs ``asv continuous`` on the two commits, rounds of the two commits
alternating so slow drifts in machine load hit both. A benchmark counts as
slower when asv flags it (ratio of medians above the factor and the two sample
sets significantly different) or when the ratio of the lower quartiles of its
timing samples is above the factor. Load from other processes only ever adds
time, so on a shared machine the lower quartile tracks the code's own cost
when the median does not: a 2x slowdown measured while the machine was busy
for half of the rounds shows up in the lower quartile and drowns in the median.

A burst of load can still land on one commit's samples only, so every
benchmark counted as slower is measured again (only those parameter
combinations, with twice the rounds: each round is a new process, and
per-process effects such as where the arrays landed in memory average out
over more of them) and the gate fails only when the second comparison says
so too.
A real slowdown survives the second run; a burst of load does not repeat on
the same benchmark.

Exit status: 0 no confirmed regression, 1 regression confirmed, other values
are asv's own failures (build errors, failing benchmarks).
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import time

# A row of asv's comparison table: | mark | before | after | ratio | name(params) |.
# Without --no-only-changed asv prints the tables with no titles, so rows are
# told apart by the mark: "+" slower, "!" newly failing (both count as worse).
_ROW = re.compile(r"^\|\s*(?P<mark>[-+!*x ]?)\s*\|[^|]*\|[^|]*\|[^|]*\|\s*(?P<name>[^|]+?)\s*\|\s*$")


def run(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``, echoing its output as it comes; return (exit status, output)."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def worse(output: str) -> list[str]:
    """Benchmark names, with their parameters, that asv marked slower or newly failing."""
    names = []
    for line in output.splitlines():
        m = _ROW.match(line.strip())
        if m and m.group("mark") in ("+", "!") and m.group("name") not in names:
            names.append(m.group("name"))
    return names


def _results_file(results_dir, sha):
    """Newest result file of commit ``sha`` (any machine, the single environment)."""
    files = glob.glob(os.path.join(results_dir, "*", sha[:8] + "-*.json"))
    return max(files, key=os.path.getmtime) if files else None


def lower_quartiles(results_dir, sha, regexes, since_ms):
    """{"name(params)": lower quartile of the timing samples} for benchmarks matching ``regexes``.

    Only benchmarks started after ``since_ms`` count: the file also holds
    results of earlier runs, possibly of benchmarks changed since.
    """
    path = _results_file(results_dir, sha)
    if path is None:
        return {}
    with open(path) as f:
        data = json.load(f)
    columns = data["result_columns"]
    out = {}
    for name, row in data["results"].items():
        r = dict(zip(columns, row))
        q25 = r.get("stats_q_25")
        if not q25 or (r.get("started_at") or 0) < since_ms:
            continue  # not a timing benchmark, or not measured by this run
        params = r.get("params") or []
        combos = list(itertools.product(*params)) if params else [()]
        for combo, q in zip(combos, q25):
            full = f"{name}({', '.join(combo)})" if params else name
            if q is not None and (not regexes or any(re.search(reg, full) for reg in regexes)):
                out[full] = q
    return out


def slower_quartiles(results_dir, base, head, factor, regexes, since_ms):
    """Benchmarks whose lower-quartile time grew by more than ``factor``, with the ratio."""
    a = lower_quartiles(results_dir, base, regexes, since_ms)
    b = lower_quartiles(results_dir, head, regexes, since_ms)
    return {k: b[k] / a[k] for k in sorted(a.keys() & b.keys()) if a[k] > 0 and b[k] / a[k] > factor}


def rev_parse(rev):
    return subprocess.run(["git", "rev-parse", rev + "^{commit}"], check=True, capture_output=True,
                          text=True).stdout.strip()


def continuous(asv, factor, rounds, benches, base, head, extra):
    cmd = [asv, "continuous", "--factor", str(factor), "--interleave-rounds", "-a", f"rounds={rounds}",
           "--split", "--show-stderr"]
    for b in benches:
        cmd += ["--bench", b]
    return run(cmd + list(extra) + [base, head])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("head")
    p.add_argument("--factor", type=float, required=True)
    p.add_argument("--bench", action="append", default=[], help="asv --bench regex (repeatable)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per commit (asv -a rounds=)")
    p.add_argument("--confirm-rounds", type=int, default=None,
                   help="rounds of the second run (default: twice --rounds; it only runs the flagged few)")
    p.add_argument("--asv", default=os.path.join(os.path.dirname(sys.executable), "asv"))
    p.add_argument("--results", default=".asv/results", help="results_dir of asv.conf.json")
    p.add_argument("extra", nargs="*", help="further asv continuous options, after --")
    args = p.parse_args(argv)

    base, head = rev_parse(args.base), rev_parse(args.head)

    def slower(rc, out, regexes, since_ms):
        """asv's own verdict joined with the lower-quartile one: {name: note}."""
        found = {name: "asv: slower (median, significant)" for name in (worse(out) if rc == 1 else [])}
        for name, ratio in slower_quartiles(args.results, base, head, args.factor, regexes, since_ms).items():
            found.setdefault(name, f"lower quartile {ratio:.2f}x")
        return found

    since = time.time() * 1000
    rc, out = continuous(args.asv, args.factor, args.rounds, args.bench, args.base, args.head, args.extra)
    if rc not in (0, 1):
        return rc  # asv's own failure: a build or a benchmark broke
    flagged = slower(rc, out, args.bench, since)
    if not flagged:
        print(f"\nno regression: nothing in {args.head} is slower than {args.base} by more than {args.factor}x")
        return 0
    print(f"\n== {len(flagged)} benchmark(s) slower by more than {args.factor}x; measuring them again ==")
    for name, note in flagged.items():
        print(f"  {name}: {note}")
    sys.stdout.flush()
    # asv's --bench selects benchmarks by name and may not match a parameter tuple, so the
    # second run selects the flagged benchmarks by name and the verdict keeps the exact
    # parameter combinations. A run that measured nothing would leave the first run's
    # results in place to "confirm" themselves: that is an error, not a verdict.
    exact = ["^" + re.escape(name) + "$" for name in flagged]
    by_name = sorted({"^" + re.escape(name.split("(")[0]) + r"(\(|$)" for name in flagged})
    rounds = args.confirm_rounds or 2 * args.rounds
    since = time.time() * 1000
    rc, out = continuous(args.asv, args.factor, rounds, by_name, args.base, args.head, args.extra)
    if rc not in (0, 1):
        return rc
    if "No benchmarks selected" in out:
        print("\nerror: the second run selected no benchmark, so nothing was confirmed", file=sys.stderr)
        return 2
    confirmed = slower(rc, out, exact, since)
    if confirmed:
        print(f"\nREGRESSION (confirmed by a second run): {args.head} is slower than {args.base} "
              f"by more than {args.factor}x in:")
        for name, note in confirmed.items():
            print(f"  {name}: {note}")
        return 1
    print(f"\nno regression: the first run's slowdowns did not repeat (machine noise): {', '.join(flagged)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
