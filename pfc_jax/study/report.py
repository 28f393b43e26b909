"""The study's summary: ``study.json``, a markdown table (``study.md``) and ``study.png``."""

from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np

PLOT_HINT = "pip install 'pfc_jax[study]'"


def write_atomic(path: pathlib.Path, data: str | bytes) -> None:
    """Writes a file whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _mean_std(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def _bucket_means(runs, key: str) -> list[dict] | None:
    """Per bucket, the mean over seeds of each seed's bucket mean (buckets of images per
    class are fixed; buckets of times sampled are the first seed's)."""
    tables = [r["staleness"][key] for r in runs if r.get("staleness") and r["staleness"].get(key)]
    if not tables:
        return None
    out = []
    for i, bucket in enumerate(tables[0]):
        means = [t[i]["mean"] for t in tables if i < len(t) and t[i]["mean"] is not None]
        out.append(
            {"low": bucket["low"], "high": bucket["high"], "classes": bucket["classes"], **(_mean_std(means) or {})}
        )
    return out


def summarize(config, results: dict[str, list[dict]], seeds: int) -> dict:
    """Per arm: mean and std over seeds of every figure."""
    import jax

    arms = {}
    for name, runs in results.items():
        sets = list(runs[0]["verification"])
        curve = {}
        for s in sets:
            by_step: dict[int, list[float]] = {}
            for r in runs:
                for step, acc in r["curve"].get(s, []):
                    by_step.setdefault(int(step), []).append(acc)
            curve[s] = [[step, float(np.mean(v))] for step, v in sorted(by_step.items())]
        arms[name] = {
            "seeds": [r["seed"] for r in runs],
            "verification": {
                s: {m: _mean_std([r["verification"][s][m] for r in runs]) for m in runs[0]["verification"][s]}
                for s in sets
            },
            "tar": None
            if runs[0]["tar"] is None
            else {k: _mean_std([r["tar"][k] for r in runs]) for k in runs[0]["tar"] if k.startswith("tar_at_far")},
            "images_per_sec": _mean_std([r["images_per_sec"] for r in runs]),
            "head_memory": runs[0]["head_memory"],
            "staleness_mean": _mean_std([r["staleness"]["mean"] for r in runs if r.get("staleness")]),
            "staleness_by_images": _bucket_means(runs, "by_images"),
            "staleness_by_samples": _bucket_means(runs, "by_samples"),
            "curve": curve,
        }
    device = jax.devices()[0]
    return {
        "machine": f"{len(jax.devices())} x {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores",
        "data": config.data.source,
        "model": config.model.name,
        "steps": results and next(iter(results.values()))[0]["steps"],
        "global_batch_size": config.global_batch_size,
        "seeds": seeds,
        "arms": arms,
    }


def _pct(stat) -> str:
    if stat is None:
        return "n/a"
    return f"{100 * stat['mean']:.2f}" + (f" ± {100 * stat['std']:.2f}" if stat.get("std") is not None else "")


def _num(stat, fmt="{:,.0f}") -> str:
    if stat is None:
        return "n/a"
    return fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat.get("std") is not None else "")


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def _range(b) -> str:
    if b["high"] is None:
        return f"{b['low']}+"
    return f"{b['low']}" if b["high"] == b["low"] + 1 else f"{b['low']}–{b['high'] - 1}"


def table(summary: dict) -> str:
    """The markdown tables: quality, cost, and staleness by frequency."""
    arms = summary["arms"]
    sets = list(next(iter(arms.values()))["verification"])
    lines = [
        f"{summary['data']}, {summary['model']}, {summary['steps']} steps of {summary['global_batch_size']}, "
        f"{summary['seeds']} seed(s) (mean ± std over seeds), on {summary['machine']}",
        "",
        "| arm | "
        + " | ".join(f"{s} accuracy (%)" for s in sets)
        + " | TAR@FAR=1e-3 (%) | TAR@FAR=1e-4 (%) | images/s | head state / step temporaries (MiB per device) "
        "| staleness (mean cos) |",
        "|---" * (len(sets) + 6) + "|",
    ]
    for name, a in arms.items():
        tar = a["tar"] or {}
        mem = a["head_memory"]
        lines.append(
            f"| `{name}` | "
            + " | ".join(_pct(a["verification"][s]["accuracy"]) for s in sets)
            + f" | {_pct(tar.get('tar_at_far_0.001'))} | {_pct(tar.get('tar_at_far_0.0001'))} "
            f"| {_num(a['images_per_sec'])} | {_mib(mem['state_bytes'])} / {_mib(mem['step_temp_bytes'])} "
            f"| {_num(a['staleness_mean'], '{:.3f}')} |"
        )
    first = next((a["staleness_by_images"] for a in arms.values() if a["staleness_by_images"]), None)
    if first:
        lines += [
            "",
            "Staleness by images per class in the training set (cosine between a class's stored weight and the "
            "mean embedding of its images; 1 = up to date):",
            "",
            "| arm | " + " | ".join(f"{_range(b)} images" for b in first) + " |",
            "|---" * (len(first) + 1) + "|",
        ]
        for name, a in arms.items():
            cells = [_num(b if b.get("mean") is not None else None, "{:.3f}") for b in a["staleness_by_images"] or []]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines += ["", "Staleness by times a class's weight was sampled (updated), in quantile buckets:", ""]
        for name, a in arms.items():
            buckets = a["staleness_by_samples"]
            text = (
                ", ".join(f"{_range(b)} times: {b['mean']:.3f}" for b in buckets if b.get("mean") is not None)
                if buckets
                else "n/a (the head does not count)"
            )
            lines.append(f"- `{name}`: {text}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: pathlib.Path) -> bool:
    """Accuracy against steps per arm, and staleness per frequency bucket, as a PNG.
    False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    arms = summary["arms"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, a in arms.items():
        for s, points in a["curve"].items():
            if points:
                steps, acc = zip(*points)
                axes[0].plot(
                    steps, 100 * np.asarray(acc), marker="o", label=f"{name} ({s})" if len(a["curve"]) > 1 else name
                )
        if a["staleness_by_images"]:
            xs = [_range(b) for b in a["staleness_by_images"]]
            axes[1].plot(xs, [b.get("mean", np.nan) for b in a["staleness_by_images"]], marker="o", label=name)
        if a["staleness_by_samples"]:
            buckets = a["staleness_by_samples"]
            axes[2].plot([b["low"] for b in buckets], [b.get("mean", np.nan) for b in buckets], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="held-out verification accuracy (%)", title="accuracy during training")
    axes[1].set(
        xlabel="images per class (training set)",
        ylabel="cos(stored weight, mean embedding)",
        title="staleness by class frequency",
    )
    axes[2].set(
        xlabel="times sampled (bucket start)",
        ylabel="cos(stored weight, mean embedding)",
        title="staleness by updates",
        xscale="symlog",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel no arm has data for stays empty
            ax.legend(fontsize=8)
    fig.suptitle(f"{summary['data']}, {summary['model']}, {summary['steps']} steps, {summary['seeds']} seed(s)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return True


def write(summary: dict, out: pathlib.Path, *, say=print) -> None:
    write_atomic(out / "study.json", json.dumps(summary, indent=1))
    text = table(summary)
    write_atomic(out / "study.md", text)
    say(text)
    if plot(summary, out / "study.png"):
        say(f"wrote {out / 'study.json'}, {out / 'study.md'} and {out / 'study.png'}")
    else:
        say(f"wrote {out / 'study.json'} and {out / 'study.md'}; no plot: matplotlib is missing ({PLOT_HINT})")
