"""What each arm's trainer saw, and the figures over stream orders: mean ± sd, the paired
difference to raw, steps to reach raw's final macro-F1, and the F1 of every class."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

import numpy as np

from bench.common import console, show


def shares(counts: Counter[str]) -> dict[str, float]:
    """Counts as shares, largest first."""
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def arm_stats(batches: list[dict[str, Any]], steps: int, eval_vecs: np.ndarray,
              vec_of: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """What the trainer sees in ``steps`` batches (cycled if fewer): samples, distinct
    ids/texts, uses per distinct sample, near copies of held-out texts, weights, mix."""
    seen = [s for n in range(steps) for s in batches[n % len(batches)]["samples"]]
    ids = Counter(s["id"] for s in seen)
    texts = {s["content"] for s in seen}
    unique_vecs = np.vstack([vec_of[i] for i in sorted(ids)])
    near = int(((unique_vecs @ eval_vecs.T).max(axis=1) >= threshold).sum())
    weights = [float(s["weight"]) for s in seen]
    return {"batches_distinct": len({b["batch_id"] for b in batches}),
            "samples_seen": len(seen), "unique_ids": len(ids), "unique_texts": len(texts),
            "uses_max": max(ids.values()), "near_copies_of_heldout": near,
            "weight_min": min(weights), "weight_max": max(weights),
            "class_mix": shares(Counter(s["label"] for s in seen)),
            "class_mix_last_quarter": shares(Counter(
                s["label"] for s in seen[len(seen) - len(seen) // 4:])),
            "class_draws_by_quarter": quarters(batches, steps),
            "last_step_with_class": last_steps(batches, steps)}


def quarters(batches: list[dict[str, Any]], steps: int) -> list[dict[str, int]]:
    """Samples of each class in each quarter of the ``steps`` batches (cycled if fewer):
    whether a class stays in the batches to the end of the run or is used up early."""
    out: list[Counter[str]] = [Counter() for _ in range(4)]
    for n in range(steps):
        out[min(3, 4 * n // steps)].update(s["label"] for s in batches[n % len(batches)]
                                           ["samples"])
    return [dict(sorted(q.items())) for q in out]


def last_steps(batches: list[dict[str, Any]], steps: int) -> dict[str, int]:
    """The last step (0-based) whose batch has a sample of each class."""
    last: dict[str, int] = {}
    for n in range(steps):
        for s in batches[n % len(batches)]["samples"]:
            last[s["label"]] = n
    return dict(sorted(last.items()))


def show_quarters(title: str, arms: dict[str, dict[str, Any]],
                  class_counts: dict[str, int]) -> None:
    """Per class, its samples in each quarter of the run, per arm (one stream order): the
    evidence for a class used up early (``0`` in the later quarters) or kept to the end."""
    names = [a for a in arms if "class_draws_by_quarter" in arms[a]]
    rows = []
    for label in sorted(class_counts, key=lambda c: -class_counts[c]):
        rows.append([label, *("/".join(str(q.get(label, 0)) for q in
                                       arms[a]["class_draws_by_quarter"])
                              for a in names)])
    show(title, ["class", *(f"{a} (q1/q2/q3/q4)" for a in names)], rows)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to_reach(curve: list[dict[str, Any]], target: float) -> int | None:
    """The first evaluated step whose macro-F1 is at least ``target`` (``None``: never)."""
    for point in curve:
        if point["macro_f1"] >= target - 1e-12:
            return int(point["step"])
    return None


def summarize(runs: list[dict[str, Any]], steps: int) -> dict[str, dict[str, Any]]:
    """Per arm over the stream orders (``runs``: one dict arm → figures per order)."""
    summary: dict[str, dict[str, Any]] = {}
    for arm in runs[0]:
        per = [r[arm] for r in runs]
        entry: dict[str, Any] = {}
        for key in ("samples_seen", "unique_ids", "unique_texts", "uses_max",
                    "near_copies_of_heldout"):
            entry[key] = statistics.fmean(p[key] for p in per)
        entry["weight_min"] = min(p["weight_min"] for p in per)
        entry["weight_max"] = max(p["weight_max"] for p in per)
        finals = [p["run"]["curve"][-1] for p in per]
        for key in ("macro_f1", "accuracy", "worst_class_f1"):
            entry[f"{key}_mean"], entry[f"{key}_sd"] = mean_sd([f[key] for f in finals])
        classes = sorted(finals[0]["class_f1"])
        entry["class_f1"] = {c: statistics.fmean(f["class_f1"][c] for f in finals)
                             for c in classes}
        mix: Counter[str] = Counter()
        for p in per:
            mix.update({k: v / len(per) for k, v in p["class_mix"].items()})
        entry["class_mix"] = {k: round(v, 4) for k, v in mix.most_common()}
        reach = [steps_to_reach(p["run"]["curve"], r["raw"]["run"]["curve"][-1]["macro_f1"])
                 for p, r in zip(per, runs, strict=True)]
        entry["steps_to_raw_final"] = reach
        median = statistics.median(math.inf if s is None else s for s in reach)
        entry["steps_to_raw_final_median"] = None if median == math.inf else median
        entry["reached_raw_final_by_half"] = sum(s is not None and s <= steps / 2
                                                 for s in reach)
        summary[arm] = entry
    raw = [r["raw"]["run"]["curve"][-1] for r in runs]
    for arm, entry in summary.items():
        if arm == "raw":
            continue
        finals = [r[arm]["run"]["curve"][-1] for r in runs]
        for key in ("macro_f1", "worst_class_f1", "accuracy"):
            diffs = [f[key] - b[key] for f, b in zip(finals, raw, strict=True)]
            entry[f"{key}_minus_raw_mean"], entry[f"{key}_minus_raw_sd"] = mean_sd(diffs)
            entry[f"{key}_wins_over_raw"] = sum(d > 0 for d in diffs)
        entry["class_f1_minus_raw"] = {c: round(v - summary["raw"]["class_f1"][c], 4)
                                       for c, v in entry["class_f1"].items()}
    return summary


def _mix_text(mix: dict[str, float], top: int = 3) -> str:
    items = list(mix.items())
    text = " ".join(f"{k[:6]} {v:.0%}" for k, v in items[:top])
    return text + (f" +{len(items) - top}" if len(items) > top else "")


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f}±{sd:.3f}"


def _delta(entry: dict[str, Any], key: str, n: int) -> str:
    if f"{key}_minus_raw_mean" not in entry:
        return ""
    return (f"{100 * entry[f'{key}_minus_raw_mean']:+.1f}±"
            f"{100 * entry[f'{key}_minus_raw_sd']:.1f} ({entry[f'{key}_wins_over_raw']}/{n})")


def show_regime(title: str, summary: dict[str, dict[str, Any]], steps: int, n: int,
                class_counts: dict[str, int], heldout_counts: dict[str, int]) -> None:
    """The regime's tables: the figures per arm, what each arm trained on, per-class F1."""
    rows, seen = [], []
    for arm, e in summary.items():
        median = e["steps_to_raw_final_median"]
        reach = (f"{'never' if median is None else round(median)} "
                 f"({e['reached_raw_final_by_half']}/{n} ≤{steps // 2})")
        rows.append([arm, _pm(e["macro_f1_mean"], e["macro_f1_sd"]), _delta(e, "macro_f1", n),
                     _pm(e["worst_class_f1_mean"], e["worst_class_f1_sd"]),
                     _delta(e, "worst_class_f1", n), _pm(e["accuracy_mean"], e["accuracy_sd"]),
                     reach])
        weights = ("all 1" if abs(e["weight_min"] - 1) < 1e-6 and abs(e["weight_max"] - 1) < 1e-6
                   else f"{e['weight_min']:.2f}–{e['weight_max']:.2f}")
        seen.append([arm, round(e["samples_seen"]), round(e["unique_ids"]),
                     round(e["uses_max"]), round(e["near_copies_of_heldout"], 1), weights,
                     _mix_text(e["class_mix"], 4)])
    show(title, ["arm", "macro-F1", "Δ vs raw (wins)", "worst-class F1", "Δ worst (wins)",
                 "accuracy", "steps to raw's final"], rows)
    show(f"{title}: what each arm trained on (mean over orders)",
         ["arm", "samples", "distinct", "max uses", "near copies of held-out",
          "batch weights", "class mix"], seen)
    console.print("[dim]Δ: points of F1, paired by stream order, mean±sd (wins: orders above "
                  "raw); steps to raw's final: median first evaluated step reaching raw's "
                  "final macro-F1 in the same order (orders reaching it by half the steps); "
                  "batch weights: their range (trained on only by the +weights arm)[/dim]")
    arms = [a for a in summary if a != "raw"]
    class_rows = []
    for label in sorted(summary["raw"]["class_f1"], key=lambda c: -class_counts.get(c, 0)):
        class_rows.append([label, class_counts.get(label, 0), heldout_counts.get(label, 0),
                           f"{summary['raw']['class_f1'][label]:.3f}",
                           *(f"{100 * summary[a]['class_f1_minus_raw'][label]:+.1f}"
                             for a in arms)])
    show(f"{title}: held-out F1 per class (raw) and Δ points vs raw, mean over orders",
         ["class", "train n", "held-out n", "raw F1", *arms], class_rows)


def summarize_lm(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The byte-LM's final held-out bits per byte per arm over the stream orders (``runs``:
    one dict arm → run per order), and the paired difference to raw (negative: better);
    the same for each subset of the held-out code (a run's ``subsets``: name → final
    bits per byte)."""
    summary: dict[str, dict[str, Any]] = {}
    for arm in runs[0]:
        entry = _lm_entry([r[arm]["curve"][-1]["bits_per_byte"] for r in runs],
                          [r["raw"]["curve"][-1]["bits_per_byte"] for r in runs], arm)
        entry["subsets"] = {
            name: _lm_entry([r[arm]["subsets"][name] for r in runs],
                            [r["raw"]["subsets"][name] for r in runs], arm)
            for name in runs[0][arm].get("subsets", {})}
        summary[arm] = entry
    return summary


def _lm_entry(finals: list[float], raw: list[float], arm: str) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    entry["bits_per_byte_mean"], entry["bits_per_byte_sd"] = mean_sd(finals)
    if arm != "raw":
        diffs = [f - b for f, b in zip(finals, raw, strict=True)]
        entry["minus_raw_mean"], entry["minus_raw_sd"] = mean_sd(diffs)
        entry["better_than_raw"] = sum(d < 0 for d in diffs)
    return entry


def show_lm(title: str, summary: dict[str, dict[str, Any]], n: int,
            sizes: dict[str, int] | None = None) -> None:
    """The byte-LM table: held-out bits per byte per arm and the paired change vs raw, on
    all the held-out code and on each subset (``sizes``: subset → texts)."""
    def cells(arm: str, e: dict[str, Any]) -> list[str]:
        return [_pm(e["bits_per_byte_mean"], e["bits_per_byte_sd"]),
                "" if arm == "raw" else f"{e['minus_raw_mean']:+.3f}±{e['minus_raw_sd']:.3f} "
                                        f"({e['better_than_raw']}/{n} below raw)"]
    names = list(next(iter(summary.values())).get("subsets", {}))
    header = ["arm", "bits per byte", "Δ vs raw (orders below raw)"]
    for name in names:
        size = f" ({sizes[name]})" if sizes and name in sizes else ""
        header += [f"{name}{size}", "Δ vs raw"]
    rows = []
    for arm, e in summary.items():
        row = [arm, *cells(arm, e)]
        for name in names:
            row += cells(arm, e["subsets"][name])
        rows.append(row)
    show(title, header, rows)
