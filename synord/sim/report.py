"""Tables (text), the published-draw check, and the PNG figure."""

from __future__ import annotations

import tomllib
from importlib import resources

import numpy as np

COLUMNS = (("cost", "cost $", "{:.0f}"), ("savings", "savings", "{:.1%}"), ("completed", "done", "{:.1f}"),
           ("preemptions", "preempt", "{:.1f}"), ("migrations", "migr", "{:.1f}"),
           ("deadline_misses", "misses", "{:.1f}"), ("free_completions", "free", "{:.1f}"),
           ("makespan_h", "makespan h", "{:.1f}"))


def published_draw(result: dict, table: dict[str, float]) -> dict:
    """Where each published single-draw cost falls in our distribution (percentile)."""
    out = {}
    for name, cost in table.items():
        v = result["variants"].get(name)
        if v is None:
            continue
        costs = np.asarray(v["costs"], float)
        out[name] = dict(published=cost, percentile=float((costs < cost).mean() * 100),
                         mean=float(costs.mean()), p5=float(np.percentile(costs, 5)),
                         p95=float(np.percentile(costs, 95)))
    return out


def reference_table(scenario_source: str) -> dict[str, float]:
    """The ``[published]`` table of a scenario file, if any."""
    from pathlib import Path
    p = Path(scenario_source)
    if p.is_file():
        text = p.read_text()
    else:
        res = resources.files(__package__).joinpath("scenarios", f"{scenario_source}.toml")
        text = res.read_text() if res.is_file() else ""
    pub = tomllib.loads(text).get("published", {}) if text else {}
    return {k: float(v) for k, v in pub.items() if isinstance(v, (int, float))}


def _cell(metric: dict, fmt: str, band: bool) -> str:
    if not metric:
        return "-"
    s = fmt.format(metric["mean"])
    if band and metric["p5"] != metric["p95"]:
        s += f" [{fmt.format(metric['p5'])}–{fmt.format(metric['p95'])}]"
    return s


def table(result: dict) -> str:
    band = result["seeds"] > 1
    head = f"{result['scenario']} ({result['rules']} rules, {result['seeds']} seed(s) from {result['seed']}"
    head += ", mean [5–95 %])" if band else ")"
    rows = [["variant"] + [c[1] for c in COLUMNS]]
    for name, v in result["variants"].items():
        m = v["metrics"]
        rows.append([name] + [_cell(m.get(k, {}), f, band and k in ("cost", "savings")) for k, _, f in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if result.get("published_draw"):
        lines.append("published single draw vs our distribution:")
        for name, d in result["published_draw"].items():
            lines.append(f"  {name}: ${d['published']:.2f} sits at percentile {d['percentile']:.0f} "
                         f"(ours: mean ${d['mean']:.0f}, 5–95 % ${d['p5']:.0f}–${d['p95']:.0f})")
    if result["paired"]:
        lines.append("paired on the same worlds (cost A − B, mean and 95 % CI):")
        for p in result["paired"]:
            ci = p["ci95"]
            lines.append(f"  {p['a']} − {p['b']}: {p['mean_diff']:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}], "
                         f"A cheaper in {p['a_cheaper_share']:.0%}: {p['verdict']}")
    return "\n".join(lines)


def side_by_side(a: dict, b: dict) -> str:
    """Savings of the variants the two results share, one line each."""
    lines = [f"{'variant':<16}{a['scenario']:>36}{b['scenario']:>36}"]
    for name in a["variants"]:
        if name not in b["variants"]:
            continue
        cells = []
        for r in (a, b):
            m = r["variants"][name]["metrics"]
            cells.append(f"${m['cost']['mean']:.0f} / {m.get('savings', {}).get('mean', float('nan')):.1%}"
                         f" / done {m['completed']['mean']:.0f}")
        lines.append(f"{name:<16}{cells[0]:>36}{cells[1]:>36}")
    return "\n".join(lines)


def figure(results: list[dict], path: str) -> None:
    """Per scenario: cost distribution per variant, and cost over time (first seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        names = list(r["variants"])
        row[0].boxplot([r["variants"][n]["costs"] for n in names], whis=(5, 95), showfliers=False)
        row[0].set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
        for name, d in r.get("published_draw", {}).items():
            row[0].plot(names.index(name) + 1, d["published"], "r*", ms=11,
                        label="published draw" if name == names[0] else None)
        row[0].set_ylabel("cost ($)")
        row[0].set_title(f"{r['scenario']}: cost over {r['seeds']} seed(s) (box 25–75 %, whiskers 5–95 %)",
                         fontsize=9)
        if r.get("published_draw"):
            row[0].legend(fontsize=8)
        t = r["curves"]["t_h"]
        for name, c in r["curves"]["cost"].items():
            row[1].plot(t, c, label=name)
        row[1].set_xlabel("simulated hours")
        row[1].set_ylabel("cumulative cost ($)")
        row[1].set_title(f"{r['scenario']}: cost over time, seed {r['seed']}", fontsize=9)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
