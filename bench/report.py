"""The bench's report: one Markdown table of both contenders' medians and their ratio, and the
section of a results file it is written into (`write_section`)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import torch

from .contenders import MODES, RunResult
from .harness import Results

def write_section(path: Path, size: str, text: str) -> None:
    """Replace the `<!-- bench:SIZE -->` section of a markdown file with `text`, or append it."""
    begin, end = f"<!-- bench:{size} -->", f"<!-- /bench:{size} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _m: block, old) if pattern.search(old) else old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new, encoding="utf-8")

def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, unit: str) -> str:
    if value != value:
        return "—"
    if unit == "MB":
        return f"{value:,.0f}"
    if unit == "Δ":
        return f"{value:.1e}"
    if unit == "×":
        return f"{value:.2f}×"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _ratio(a: float, b: float) -> str:
    if a != a or b != b or b == 0:
        return "—"
    return f"{a / b:.2f}"


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None or a.shape != b.shape:
        return float("nan")
    return (a.float() - b.float()).abs().max().item()


def table(results: Results, steps: int) -> str:
    mem = results.memory_label
    rows = ["| mode | metric | ours | diffusers | ours/diffusers |", "|---|---|---:|---:|---:|"]

    def row(mode: str, metric: str, ours: float, theirs: float, unit: str, ratio: bool = True) -> None:
        rows.append(
            f"| {mode} | {metric} | {_fmt(ours, unit)} | {_fmt(theirs, unit)} | "
            f"{_ratio(ours, theirs) if ratio else ''} |"
        )

    def text_row(mode: str, metric: str, ours: str, theirs: str, ratio: str = "") -> None:
        rows.append(f"| {mode} | {metric} | {ours} | {theirs} | {ratio} |")

    ours, theirs = results.default["ours"], results.default["diffusers"]
    n = len(ours)
    encode_rows = (
        ("text encode s (ours: load T5, encode, release; diffusers: its encode_prompt in pipe)", "encode_s", "s"),
        (f"text encode {mem}", "encode_mb", "MB"),
    ) if results.prompts else ()
    if mem.startswith("peak GPU"):
        whole = (("end-to-end peak GPU MB (max allocated, from before load)", "run_mb", "MB"),)
    else:
        whole = (
            ("end-to-end peak RSS MB (from before load)", "run_mb", "MB"),
            ("end-to-end peak RssAnon MB (anonymous memory only, from before load)", "run_anon_mb", "MB"),
        )
    for label, attr, unit in (
        *encode_rows,
        ("load s", "load_s", "s"),
        (f"load {mem}", "load_mb", "MB"),
        ("held after load MB (the loaded weights)", "held_mb", "MB"),
        ("setup + step 1 s (first-frame VAE encode, warm-up)", "setup_s", "s"),
        (f"s/step (steps 2–{steps})" if steps > 1 else "s/step", "step_s", "s"),
        (f"sampling {mem}", "sample_mb", "MB"),
        ("VAE decode s", "decode_s", "s"),
        (f"decode {mem}", "decode_mb", "MB"),
        ("end-to-end s (encode + sample + decode)" if results.prompts else "end-to-end s (sample + decode)",
         "total_s", "s"),
        *whole,
    ):
        row(f"default (median of {n})", label, _median([getattr(r, attr) for r in ours]),
            _median([getattr(r, attr) for r in theirs]), unit)
    diffs = [_max_diff(a.frames, b.frames) for a, b in zip(ours, theirs)]
    text_row(f"default (median of {n})", "max \\|Δ\\| frames, ours vs diffusers (0..1)", _fmt(max(diffs, default=float("nan")), "Δ"), "", "")
    errors = [f"{r.error}" for r in ours + theirs if r.error]
    if errors:
        text_row("default", "errors", "; ".join(errors), "", "")
    base = {name: runs[-1] if runs else RunResult() for name, runs in results.default.items()}
    uncached_step = _median([r.step_s for r in ours])
    uncached_sample = _median([r.sample_s for r in ours])

    for name, by_path in results.modes.items():
        mode = MODES[name]
        o, d = by_path.get("ours", RunResult()), by_path.get("diffusers")
        label = mode.label if name != "tiling" else f"{mode.label} {results.tiling}"
        if o.error or (d is not None and d.error):
            text_row(label, "failed", o.error or "", d.error if d is not None else "", "")
        no = float("nan")
        if mode.kind == "decode":
            row(label, "VAE decode s", o.decode_s, d.decode_s if d else no, "s")
            row(label, f"decode {mem}", o.decode_mb, d.decode_mb if d else no, "MB")
            text_row(label, "max \\|Δ\\| frames vs the same path's default decode",
                     _fmt(_max_diff(o.frames, base["ours"].frames), "Δ"),
                     _fmt(_max_diff(d.frames, base["diffusers"].frames), "Δ") if d else "—")
            text_row(label, "max \\|Δ\\| frames, ours vs diffusers",
                     _fmt(_max_diff(o.frames, d.frames if d else None), "Δ"), "", "")
        elif name.startswith("cache"):
            none = "— (diffusers has no step cache for ConsisID)"
            text_row(label, "s/step (steps 2–N)", _fmt(o.step_s, "s"), none)
            text_row(label, "speed-up vs uncached: s/step", _fmt(uncached_step / o.step_s, "×"), "—")
            text_row(label, "speed-up vs uncached: whole sampling", _fmt(uncached_sample / o.sample_s, "×"), "—")
            if o.cache_counts:
                text_row(label, "transformer forwards computed / skipped", "%d / %d" % o.cache_counts, "—")
            text_row(label, "max \\|Δ\\| latents vs uncached", _fmt(_max_diff(o.latents, base["ours"].latents), "Δ"), "—")
        else:
            decoded = o.frames is not None or (d is not None and d.frames is not None)
            metrics = [("load s", "load_s", "s"), ("held after load MB (the loaded weights)", "held_mb", "MB"),
                       ("s/step (steps 2–N)", "step_s", "s"),
                       ("sampling s", "sample_s", "s"), (f"sampling {mem}", "sample_mb", "MB")]
            if decoded:
                metrics += [("VAE decode s", "decode_s", "s"), (f"decode {mem}", "decode_mb", "MB"),
                            ("end-to-end s", "total_s", "s")]
            for metric, attr, unit in metrics:
                row(label, metric, getattr(o, attr), getattr(d, attr) if d else no, unit)
            what = "frames" if decoded else "latents"
            text_row(label, f"max \\|Δ\\| {what} vs the same path's default",
                     _fmt(_max_diff(getattr(o, what), getattr(base["ours"], what)), "Δ"),
                     _fmt(_max_diff(getattr(d, what), getattr(base["diffusers"], what)), "Δ") if d else "— (no counterpart)")
            if d is not None:
                text_row(label, f"max \\|Δ\\| {what}, ours vs diffusers",
                         _fmt(_max_diff(getattr(o, what), getattr(d, what)), "Δ"), "", "")
    for name, why in results.skipped.items():
        text_row(MODES[name].label, "not run", why, "", "")
    return "\n".join(rows)
