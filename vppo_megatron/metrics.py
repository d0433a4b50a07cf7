"""Step metrics to the console, a JSONL file, TensorBoard and wandb (when configured), and the reward curve PNG.

Names are namespaced by stage (`rollout/`, `reward/`, `vppo/`, `actor/`, `sync/`, `time/`, `val/`) so dashboards
read in data-flow order. Only trainer rank 0 logs.
"""

from __future__ import annotations

import json
from pathlib import Path

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

    def log(self, step: int, metrics: dict[str, float]) -> None:
        ordered = dict(sorted(metrics.items(), key=lambda kv: _order(kv[0])))
        if self.cfg.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **ordered}) + "\n")
        if self.cfg.console:
            keys = [
                k
                for k in (
                    "reward/accuracy",
                    "val/accuracy",
                    "actor/loss",
                    "actor/grad_norm",
                    "vppo/selected_fraction",
                    "time/step_s",
                )
                if k in ordered
            ]
            print(f"step {step}: " + "  ".join(f"{k}={ordered[k]:.4g}" for k in keys), flush=True)
        if self.tensorboard is not None:
            for name, value in ordered.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(ordered, step=step)

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, path: Path, keys=("reward/accuracy", "val/accuracy")) -> Path:
        """A small PNG of the accuracy curves (Pillow only: no plotting dependency)."""
        from PIL import Image, ImageDraw

        width, height, margin = 640, 360, 40
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
        rows = self.history()
        last = max((r["step"] for r in rows), default=1) or 1
        for key, colour in zip(keys, ("blue", "red")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            xy = [
                (margin + (width - 2 * margin) * s / last, height - margin - (height - 2 * margin) * v)
                for s, v in points
            ]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            draw.text((margin + 5, margin + 5 + 14 * keys.index(key)), key, fill=colour)
        draw.text((margin, height - margin + 5), f"step 0 .. {last}   accuracy 0 .. 1", fill="black")
        image.save(path)
        return path
