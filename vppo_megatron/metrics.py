"""Step metrics to the console, a JSONL file, TensorBoard and wandb (when configured), and the reward curve PNG.

Names are namespaced by stage (`rollout/`, `reward/`, `vppo/`, `actor/`, `sync/`, `time/`, `val/`) so dashboards
read in data-flow order. Only trainer rank 0 logs.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

STAGE_ORDER = ("rollout/", "reward/", "vppo/", "actor/", "sync/", "val/", "time/")


def _order(name: str) -> tuple[int, str]:
    return next((i for i, p in enumerate(STAGE_ORDER) if name.startswith(p)), len(STAGE_ORDER)), name


class MetricsLogger:
    def __init__(self, cfg, output_dir: Path):
        self.cfg, self.dir = cfg.logging, output_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.tensorboard = None
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        self.wandb = None
        if self.cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(project=self.cfg.wandb_project, config=cfg.to_dict())

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        ordered = dict(sorted(metrics.items(), key=lambda kv: _order(kv[0])))
        if self.cfg.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **ordered}) + "\n")
        if self.cfg.console and console:
            keys = [
                k
                for k in (
                    "reward/accuracy",
                    "val/accuracy",
                    "sft/nll",
                    "actor/loss",
                    "actor/grad_norm",
                    "vppo/selected_fraction",
                    "time/step_s",
                )
                if k in ordered
            ]
            tqdm.write(f"step {step}: " + "  ".join(f"{k}={ordered[k]:.4g}" for k in keys))
        if self.tensorboard is not None:
            for name, value in ordered.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(ordered, step=step)

    def log_histograms(self, step: int, histograms: dict[str, dict]) -> None:
        """Per-step histograms (algo/diagnostics.py: edges, counts with under- and overflow bins, moments) to
        histograms.jsonl and TensorBoard (`vppo/<name>`)."""
        if not histograms:
            return
        if self.cfg.jsonl:
            with open(self.dir / "histograms.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **histograms}) + "\n")
        if self.tensorboard is not None:
            for name, h in histograms.items():
                total = sum(h["counts"])
                if not total:
                    continue
                edges = list(h["edges"])
                limits = [*edges, max(h["max"], edges[-1]) * 2 + 1e-12]  # each bucket's right edge; last: overflow
                self.tensorboard.add_histogram_raw(
                    f"vppo/{name}", h["min"], h["max"], total, h["sum"], h["sum_squares"], limits, h["counts"], step
                )
            self.tensorboard.flush()

    def histograms(self) -> list[dict]:
        path = self.dir / "histograms.jsonl"
        if not path.exists():
            return []
        by_step = {}
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_step[row["step"]] = row  # a resumed run's repeat of a step replaces it
        return [by_step[s] for s in sorted(by_step)]

    def plot_perception(self, path: Path) -> Path | None:
        """The end-of-run PNG of the perception histograms: each panel the first and the last step's distribution
        (share of its entries per bin), with the last step's diagnostics above (None without histograms)."""
        from PIL import Image, ImageDraw

        rows = self.histograms()
        if not rows:
            return None
        first, last = rows[0], rows[-1]
        names = [n for n in ("token_dependency", "trajectory_dependency", "tas_alpha") if n in last]
        panel_w, panel_h, pad, top = 300, 220, 40, 70
        image = Image.new("RGB", (pad + len(names) * (panel_w + pad), top + panel_h + pad + 20), "white")
        draw = ImageDraw.Draw(image)
        metrics = next((r for r in reversed(self.history()) if "vppo/dependency_top10_share" in r), {})
        facts = [
            ("top-10% share of dependency", "vppo/dependency_top10_share"),
            ("answer tokens", "vppo/answer_token_fraction"),
            ("selected that are answer", "vppo/selected_answer_fraction"),
            ("answer tokens selected", "vppo/answer_tokens_selected"),
        ]
        line = "  ".join(f"{label} {metrics[key]:.3f}" for label, key in facts if key in metrics)
        draw.text((pad, 10), f"perception diagnostics ({self.dir.name}), steps {first['step']} and {last['step']}")
        draw.text((pad, 28), f"step {metrics.get('step', last['step'])}: {line}", fill="black")
        draw.text((pad, 46), f"step {first['step']}", fill=(120, 120, 120))
        draw.text((pad + 80, 46), f"step {last['step']}", fill=(200, 30, 30))
        for k, name in enumerate(names):
            x0, y0 = pad + k * (panel_w + pad), top
            draw.rectangle([x0, y0, x0 + panel_w, y0 + panel_h], outline="black")
            edges = last[name]["edges"]
            log_x = name != "tas_alpha"
            ticks = [f"{e:.0e}" if log_x else f"{e:.2f}" for e in (edges[0], edges[len(edges) // 2], edges[-1])]
            for tick, frac in zip(ticks, (0.0, 0.5, 1.0)):
                draw.text((x0 + frac * panel_w - 14, y0 + panel_h + 4), tick, fill="black")
            draw.text((x0 + 4, y0 + 4), name.replace("_", " "), fill="black")
            for row, colour in ((first, (120, 120, 120)), (last, (200, 30, 30))):
                counts = row[name]["counts"]
                total = sum(counts) or 1
                shares = [c / total for c in counts]
                width = panel_w / len(shares)
                points = [
                    (x0 + width * (i + 0.5), y0 + panel_h - (panel_h - 20) * share / max(max(shares), 1e-12))
                    for i, share in enumerate(shares)
                ]
                draw.line(points, fill=colour, width=2)
        image.save(path)
        return path

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, path: Path, keys=("reward/accuracy", "val/accuracy")) -> Path:
        """A small PNG of the accuracy curves with a labelled grid (Pillow only: no plotting dependency)."""
        from PIL import Image, ImageDraw

        width, height, left, margin = 640, 360, 50, 36
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        rows = self.history()
        last = max((r["step"] for r in rows), default=1) or 1

        def xy(step: float, value: float) -> tuple[float, float]:
            return left + (width - left - margin) * step / last, height - margin - (height - 2 * margin) * value

        for tenth in range(0, 11, 2):
            y = xy(0, tenth / 10)[1]
            draw.line([(left, y), (width - margin, y)], fill=(225, 225, 225))
            draw.text((left - 28, y - 6), f"{tenth / 10:.1f}", fill="black")
        for step in sorted({r["step"] for r in rows if any(k in r for k in keys)}):
            x = xy(step, 0)[0]
            draw.text((x - 4, height - margin + 4), str(step), fill="black")
        draw.rectangle([left, margin, width - margin, height - margin], outline="black")
        for key, colour in zip(keys, ("blue", "red")):
            points = [xy(r["step"], r[key]) for r in rows if key in r]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            values = [r[key] for r in rows if key in r]
            label = f"{key}: {values[0]:.3f} -> {values[-1]:.3f}" if values else f"{key}: none"
            draw.text((left + 8, margin + 6 + 14 * keys.index(key)), label, fill=colour)
        draw.text((left, 10), f"accuracy by step ({self.dir.name})", fill="black")
        image.save(path)
        return path


class Progress:
    """A tqdm bar over a run's steps that also names the phase in flight (rollout, experience, update, sync), so a
    long CPU step shows where it is; a no-op when disabled (logging.progress_bars, or ranks other than 0)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True) if enabled else None

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)

    def advance(self, metrics: dict[str, float], keys=("reward/accuracy", "val/accuracy", "actor/loss")) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                {k.replace("/", "_"): f"{metrics[k]:.3g}" for k in keys if k in metrics}, refresh=False
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
