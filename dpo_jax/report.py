"""What a run reports: metrics to `metrics.jsonl` and TensorBoard (and W&B when asked), a progress bar, the
plots at the end, and a one-screen summary.

`metrics.jsonl` has one JSON object per logged step (TRL's metric names) and one per evaluation (`eval_*`
names, as TRL's log history). On resume, rows after the resumed step are dropped first, so the file always
tells the one history that produced the parameters; TensorBoard gets the same cut (`purge_step`).
Each train row also has `skipped_steps`: the steps so far whose update was skipped as not finite.
Only process 0 reports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from .errors import UserError

REPORT_TO = ("tensorboard", "wandb", "none")
PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
          ("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the rows before it are whole
            break
    return rows


def cut_metrics(path: Path, last_step: int) -> None:
    """Keep only the rows up to `last_step` (atomically): a resumed run re-logs what comes after it."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def validate(report_to: tuple[str, ...]) -> set[str]:
    """The integrations `report_to` asks for; unknown names and a missing wandb are errors (raised before
    anything is loaded or written)."""
    unknown = [r for r in report_to if r not in REPORT_TO + ("all",)]
    if unknown:
        raise UserError(f"report_to: unknown {', '.join(unknown)}; choose from {', '.join(REPORT_TO)} or all")
    wandb = importlib.util.find_spec("wandb") is not None
    if "all" in report_to:  # as transformers: every integration that is installed
        return {"tensorboard", "wandb"} if wandb else {"tensorboard"}
    wanted = set(report_to) - {"none"}
    if "wandb" in wanted and not wandb:
        raise UserError("report_to wandb: the wandb package is not installed (pip install wandb), or drop wandb")
    return wanted


class Reporter:
    """Writes logged metrics everywhere they are asked for; `report_to` is TRL's option (a tuple)."""

    def __init__(self, out: Path, report_to: tuple[str, ...], *, start_step: int, run_name: str,
                 config: dict, enabled: bool = True):
        wanted = validate(report_to)
        self.enabled, self.path = enabled, out / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if start_step:
            cut_metrics(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old output_dir starts a new history
        self.file = open(self.path, "a")
        if "tensorboard" in wanted:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides earlier files' points from this step on (a resumed or restarted run)
            self.tb = SummaryWriter(str(out / "runs"), purge_step=start_step + 1)
        if "wandb" in wanted:
            import wandb

            self.wandb = wandb.init(name=run_name, config=config, resume="allow",
                                    id=os.environ.get("WANDB_RUN_ID"))
            self.wandb_where = self.wandb.url or self.wandb.dir

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        tagged = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for tag, value in tagged.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(tagged, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot(metrics_path: Path, out_path: Path) -> Path:
    """plots.png: loss, reward accuracy, margin, chosen and rejected rewards against the step, train and eval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4), constrained_layout=True)
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval_", "o-")):
            points = [(r["step"], r[prefix + key]) for r in rows if prefix + key in r]
            if points:
                ax.plot(*zip(*points), style, markersize=3, label="eval" if prefix else "train")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    tmp = out_path.with_name(".plots.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def progress(total: int, start: int, enabled: bool):
    """A tqdm bar over the steps (step, loss, reward accuracy, margin, tokens/s; tqdm adds the ETA)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def postfix(metrics: dict, tokens_per_second: float) -> dict:
    return {"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics['rewards/accuracies']:.2f}",
            "margin": f"{metrics['rewards/margins']:.3f}", "tok/s": f"{tokens_per_second:,.0f}"}


def summary(*, final: dict, train: dict, steps: int, tokens: int, seconds: float, out: Path,
            written: list[str], skipped: int = 0) -> str:
    """The one screen printed at the end of training; `skipped` of the `steps` applied no update."""
    why = "loss, gradients or update not finite"
    done = (f"ran {steps} steps but applied no update: all were skipped ({why})" if skipped and skipped == steps
            else f"trained {steps} steps" + (f" ({skipped} skipped: {why})" if skipped else ""))
    lines = [f"dpo-jax: {done} in {_duration(seconds)} ({tokens / max(seconds, 1e-9):,.0f} tokens/s)"]
    shown = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    if train:
        lines.append("  last train  " + "  ".join(f"{k}={train[k]:.4f}" for k in shown if k in train))
    if final:
        lines.append("  final eval  " + "  ".join(f"{k[5:]}={final[k]:.4f}" for k in
                                                  (f"eval_{s}" for s in shown) if k in final))
    lines.append(f"  written to {out}:")
    lines += [f"    {w}" for w in written]
    if "checkpoints/" in written:  # save_strategy no leaves nothing to export
        lines.append(f"  export: dpo-jax export --checkpoint {out} --output_dir {out / 'hf'}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
