"""Merge two `llmdrop probe` (or `llmdrop inject --task`) JSON runs over different layers into one file and plot.

Used for docs/attend-first.md: a coarse run (every 4th layer) and a dense one (layers 17-29) with the same prompts and
seed. Layers both runs measured must agree exactly, which checks that they are comparable; the dense run wins.

    python scripts/merge_probe_runs.py probe  COARSE.json DENSE.json OUT.json OUT.png
    python scripts/merge_probe_runs.py inject COARSE.json DENSE.json OUT.json OUT.png
"""

import json
import sys

from llmdrop.analysis.probing import harmless_from, plot_inject, plot_probe, write_json


def merge(coarse: list[dict], dense: list[dict], key) -> list[dict]:
    old = {key(r): r for r in coarse}
    for r in dense:
        if key(r) in old and old[key(r)] != r:
            sys.exit(f"error: the runs disagree at {key(r)}: {old[key(r)]} vs {r}")
    seen = {key(r) for r in dense}
    return sorted([r for r in coarse if key(r) not in seen] + dense, key=key)


def main(kind: str, coarse_path: str, dense_path: str, out: str, plot: str) -> None:
    coarse, dense = json.load(open(coarse_path)), json.load(open(dense_path))
    merged = dict(dense)
    if kind == "probe":
        if coarse["baseline"] != dense["baseline"]:
            sys.exit("error: the runs have different baselines (different prompts or seed?)")
        merged["results"] = merge(coarse["results"], dense["results"], lambda r: (r["manipulation"], r["layer"]))
        write_json(merged, out)
        plot_probe(merged, plot)
        for m in sorted({r["manipulation"] for r in merged["results"]}):
            print(f"{m}: harmless from layer {harmless_from(merged, m)}")
    else:
        merged["layers"] = merge(coarse["layers"], dense["layers"], lambda r: r["layer"])
        write_json(merged, out)
        plot_inject(merged, plot)
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    main(*sys.argv[1:])
