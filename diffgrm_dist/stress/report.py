"""The stress report: growth exponents of cost along each axis (against the paper's
theory), the largest models that fit, plots and ``report.md``. Reporting only: nothing
here runs a point."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from diffgrm_dist.stress.config import StressConfig, SweepConfig

# --------------------------------------------------------------------------- report

# Theory of decoding cost per user along each axis (exponent of the axis), as the paper
# states it (decoder work O(B * n^2 * d) for CPD, O(B * n * d) for AR with a KV cache);
# the d exponent counts attention work, the MLPs' FLOPs grow with d^2.
THEORY = {  # per method (stress.config.method), per axis
    method: {"eval.beam_size": 1.0, "sids.digits": digits, "model.d_model": 1.0, "items": 0.0,
             "model.decoder_layers": 1.0}
    for method, digits in (("diffusion", 2.0), ("autoregressive", 1.0), ("autoregressive_nocache", 2.0))
}
# Training cost per sample: FLOPs grow with d^2 and with layers; ranks split the samples
# (ideal data parallelism: cost per sample of the whole job falls as 1/world, exponent 0 in
# CPU seconds per sample, since every rank's CPU time is counted).
TRAIN_THEORY = {"model.d_model": 2.0, "model.decoder_layers": 1.0, "sids.digits": 1.0, "train.batch_size": 0.0,
                "world_size": 0.0}
NUMERIC_AXES = ("eval.beam_size", "sids.digits", "items", "model.d_model", "model.decoder_layers", "eval.batch_size",
                "sids.codebook_size", "train.batch_size", "world_size", "eval.fill_digits")


def _cost(row) -> float:
    """What the exponents are fitted to: CPU seconds per user (decode) or per sample (train)
    for points that ran on CPU (robust to other load on a shared machine: time spent waiting
    for a core is not counted), wall seconds on GPU."""
    units = row["timed_users"] if row["kind"] == "decode" else row["timed_samples"]
    if str(row.get("device", "cpu")).startswith("cpu") and row.get("cpu_s", 0) > 0:
        return row["cpu_s"] / units
    return row["seconds"] / units


def growth_fits(cfg: StressConfig, table) -> list[dict[str, Any]]:
    """For every sweep, varied numeric axis and group of the other varied axes: the slope
    of log(cost) against log(axis) over the points that ran (least squares)."""
    fits = []
    ok = table[table["status"] == "ok"]
    for sweep in cfg.sweeps:
        if sweep.kind == "largest":
            continue
        rows = ok[ok["sweep"] == sweep.name]
        for axis in (a for a in sweep.vary if a in NUMERIC_AXES and len(sweep.vary[a]) > 1):
            others = [a for a in sweep.vary if a != axis]
            groups = rows.groupby(others, dropna=False) if others else [((), rows)]
            for key, group in groups:
                group = group.sort_values(axis)
                if group[axis].nunique() < 2:
                    continue
                x = np.log(group[axis].to_numpy(dtype=float))
                y = np.log([_cost(r) for _, r in group.iterrows()])
                slope = float(np.polyfit(x, y, 1)[0])
                key = key if isinstance(key, tuple) else (key,)
                theory = (THEORY.get(group["method"].iloc[0], {}).get(axis) if sweep.kind == "decode"
                          else TRAIN_THEORY.get(axis))
                fits.append({"sweep": sweep.name, "axis": axis, "group": dict(zip(others, map(_plain, key))),
                             "exponent": round(slope, 3), "theory": theory, "points": int(len(group)),
                             "range": [_plain(group[axis].min()), _plain(group[axis].max())]})
    return fits


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones; whole floats (ints that met a NaN in the table) as ints."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def write_plots(cfg: StressConfig, table, folder: Path) -> list[str]:
    """One PNG per sweep: cost (and peak memory) against its first numeric axis, a line per
    combination of the other axes; failed points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sweep in cfg.sweeps:
        rows = table[table["sweep"] == sweep.name]
        numeric = [a for a in sweep.vary if a in NUMERIC_AXES and len(sweep.vary[a]) > 1]
        if sweep.kind == "largest":
            numeric = [sweep.search]
        if rows.empty or not sweep.vary and not numeric:
            continue
        if not numeric:  # categorical axes only (ZeRO stage, dtype, decoder): bars
            written.append(_bar_plot(sweep, rows, folder))
            continue
        axis = numeric[0]
        others = [a for a in sweep.vary if a != axis]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        groups = rows.groupby(others, dropna=False) if others else [((), rows)]
        metric = "users_per_s" if sweep.kind == "decode" else "samples_per_s"
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{a}={_plain(v)}" for a, v in zip(others, key)) or sweep.name
            group = group.sort_values(axis)
            good = group[group["status"] == "ok"]
            if metric in good:
                left.plot(good[axis], good[metric], marker="o", label=label)
            right.plot(group[axis], group["peak_mem_mib"] / 1024, marker="o", label=label)
            bad = group[group["status"] != "ok"]
            right.scatter(bad[axis], bad["peak_mem_mib"] / 1024, marker="x", color="red", zorder=3)
        left.set(xscale="log", yscale="log", xlabel=axis, ylabel=metric.replace("_", " "), title=sweep.name)
        right.set(xscale="log", xlabel=axis, ylabel="peak memory GiB (x: over a limit)", title=f"{sweep.name}: memory")
        for ax in (left, right):
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{sweep.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(f"plots/{path.name}")
    return written


def _bar_plot(sweep: SweepConfig, rows, folder: Path) -> str:
    import matplotlib.pyplot as plt

    metric = "users_per_s" if sweep.kind == "decode" else "samples_per_s"
    labels = [", ".join(f"{a}={_plain(r[a])}" for a in sweep.vary) for _, r in rows.iterrows()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = [float(r[metric]) if r["status"] == "ok" else 0.0 for _, r in rows.iterrows()]
    left.bar(range(len(rows)), values, color=["tab:blue" if r["status"] == "ok" else "tab:red"
                                              for _, r in rows.iterrows()])
    right.bar(range(len(rows)), rows["peak_mem_mib"] / 1024, color="tab:gray")
    for ax, title in ((left, metric.replace("_", " ")), (right, "peak memory GiB")):
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set(title=f"{sweep.name}: {title}")
    fig.tight_layout()
    path = folder / f"{sweep.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plots/{path.name}"


def largest_table(cfg: StressConfig, table) -> list[dict[str, Any]]:
    """For each combination of each ``largest`` sweep: the largest size that fit, its
    parameters, and the first size that did not (with the limit it hit)."""
    found = []
    for sweep in (s for s in cfg.sweeps if s.kind == "largest"):
        rows = table[table["sweep"] == sweep.name]
        others = list(sweep.vary)
        groups = rows.groupby(others, dropna=False) if others else [((), rows)]
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            good, bad = group[group["status"] == "ok"], group[group["status"] != "ok"]
            best = good.loc[good[sweep.search].idxmax()] if len(good) else None
            first_bad = bad.loc[bad[sweep.search].idxmin()] if len(bad) else None
            found.append({"sweep": sweep.name, **dict(zip(others, map(_plain, key))), "axis": sweep.search,
                          "largest": None if best is None else _plain(best[sweep.search]),
                          "parameters": None if best is None else _plain(best.get("parameters")),
                          "decoder_parameters": None if best is None else _plain(best.get("decoder_parameters")),
                          "peak_mem_gib": None if best is None else round(best["peak_mem_mib"] / 1024, 2),
                          "samples_per_s": None if best is None else round(float(best["samples_per_s"]), 1),
                          "first_failure": None if first_bad is None else _plain(first_bad[sweep.search]),
                          "failure": None if first_bad is None else f"{first_bad['status']}: {first_bad['limit']}",
                          "probes": int(len(group))})
    return found


def node_ids(table) -> list[str]:
    """The Ray nodes the points ran on; "" is a point Ray failed before it named a node."""
    return sorted(set(table["node_id"]) - {""})


def report(cfg: StressConfig, table, fits: list[dict[str, Any]], plots: list[str], wall_s: float) -> str:
    nodes = node_ids(table)
    lines = [f"# Stress report: {cfg.name}", "",
             f"{len(table)} points on {len(nodes)} Ray node id(s) (a node's id is new in every Ray session) "
             f"in {wall_s / 60:.1f} min; "
             f"{int((table['status'] == 'ok').sum())} ran, "
             f"{int((table['status'] == 'oom').sum())} over the memory limit, "
             f"{int((table['status'] == 'timeout').sum())} over the time limit, "
             f"{int((table['status'] == 'error').sum())} failed otherwise. Limits per point: "
             f"{cfg.limits.memory_gib:g} GiB (process tree RSS), {cfg.limits.timeout_s:g} s, unless a sweep sets its own. "
             f"Decode points time {cfg.users} users after a warm-up batch, {cfg.history} history slots; "
             f"train points time {cfg.train_steps} steps after a warm-up step. Random weights and codes: "
             "cost does not depend on them.", ""]
    if fits:
        lines += ["## Growth exponents", "",
                  "Slope of log(cost) against log(axis), cost = CPU seconds (all threads and ranks; wall seconds "
                  "on GPU) per user (decode) or per sample (train): waiting for a core on a shared machine is not "
                  "counted. "
                  "Theory (decode, per user): CPD decoder work O(B * n^2 * d), AR with a KV cache O(B * n * d), "
                  "AR re-running its prefix O(B * n^2 * d); catalogue size 0 (O(1) look-ups). The d exponent "
                  "counts attention work; the MLP FLOPs grow with d^2, so expect 1-2 there.", "",
                  "| sweep | axis | other axes | range | points | exponent | theory |", "|---|---|---|---|---|---|---|"]
        for f in fits:
            other = ", ".join(f"{k}={v}" for k, v in f["group"].items()) or "-"
            theory = "-" if f["theory"] is None else f"{f['theory']:g}"
            lines.append(f"| {f['sweep']} | {f['axis']} | {other} | {f['range'][0]}-{f['range'][1]} | "
                         f"{f['points']} | {f['exponent']:.2f} | {theory} |")
        lines.append("")
    largest = largest_table(cfg, table)
    if largest:
        lines += ["## Largest model that trains within the memory limit", "",
                  "| sweep | setting | axis | largest | parameters | decoder params | peak GiB | samples/s | "
                  "first failure | failure | probes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in largest:
            setting = ", ".join(f"{k}={r[k]}" for k in r if k not in (
                "sweep", "axis", "largest", "parameters", "decoder_parameters", "peak_mem_gib", "samples_per_s",
                "first_failure", "failure", "probes"))
            lines.append(f"| {r['sweep']} | {setting or '-'} | {r['axis']} | {r['largest']} | "
                         f"{_num(r['parameters'])} | {_num(r['decoder_parameters'])} | {r['peak_mem_gib']} | "
                         f"{r['samples_per_s']} | {r['first_failure']} | {r['failure']} | {r['probes']} |")
        lines.append("")
    for sweep in cfg.sweeps:
        rows = table[table["sweep"] == sweep.name]
        if rows.empty:
            continue
        varied = list(sweep.vary) + ([sweep.search] if sweep.kind == "largest" else [])
        metrics = (["users_per_s", "cpu_ms_per_user", "pass_latency_ms", "distinct_codes_per_user", "index_mib"]
                   if sweep.kind == "decode" else ["samples_per_s", "cpu_ms_per_sample", "step_ms", "parameters"])
        lines += [f"## {sweep.name} ({sweep.kind})", "",
                  "| " + " | ".join([*varied, *metrics, "peak MiB", "status", "node"]) + " |",
                  "|" + "---|" * (len(varied) + len(metrics) + 3)]
        for _, r in rows.iterrows():
            cells = [str(_plain(r[a])) for a in varied]
            cells += [_fmt(r.get(m)) if r["status"] == "ok" else "-" for m in metrics]
            status = r["status"] if r["status"] == "ok" else f"{r['status']} ({r['limit']})"
            cells += [f"{r['peak_mem_mib']:.0f}", status, str(r["node_id"])[:8]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def _num(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value):,}"
