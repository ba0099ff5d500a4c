"""What a run shows and records (rank 0 only): a progress bar per epoch, JSON lines, TensorBoard, a plot.

Files written into the run folder:

* ``metrics.jsonl``: one JSON object per line; ``event`` is ``start``, ``train`` (averages over a
  logging interval: loss, each term, lr, images/s), ``eval`` (top-1/top-5 after an epoch),
  ``stage`` (a stage's settings: effective batch, lr used), ``teacher_eval`` or ``end``; records of
  a cached network's pretraining carry ``"pretrain": true`` (and stay out of the plot);
* ``tb/``: TensorBoard event files (``tensorboard --logdir OUT/tb``), if tensorboard is installed;
* ``curves.png``: loss (and terms) per step and top-1/top-5 per epoch, redrawn after every epoch.

On a terminal the progress bar is rich's; when the output is piped or logged, a plain line is
printed every tenth of an epoch instead.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from ..formatting import number, seconds

__all__ = ["Monitor", "SUITE_PROGRESS"]


SUITE_PROGRESS: Any = None  # set by kdgraph.bench while a suite runs (an object with title/total/done/text())


class Monitor:
    """Console, progress and metric files of one run. Every method is a no-op when ``enabled`` is False."""

    def __init__(self, out: Optional[Path], enabled: bool = True, progress: Optional[bool] = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.out = out
        self.console = Console(highlight=False, stderr=False)
        self.interactive = self.console.is_terminal if progress is None else progress
        self._tb_wanted = tensorboard
        self._tb: Any = None
        self._jsonl = None
        self.train_records: list[dict[str, Any]] = []
        self.eval_records: list[dict[str, Any]] = []
        self._progress: Any = None
        self._task: Any = None
        self._plain_next = 0
        self.tokens_per_row: Optional[int] = None  # text data: train records' positions_per_s = images_per_s x this

    # ------------------------------------------------------------------ console
    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def record(self, event: str, **fields: Any) -> None:
        """Append one JSON line (and keep train/eval records for the plot)."""
        if not self.enabled:
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        if event == "train" and self.tokens_per_row and isinstance(fields.get("images_per_s"), (int, float)):
            rec["positions_per_s"] = round(fields["images_per_s"] * self.tokens_per_row, 1)  # padding included
        if self._jsonl is None and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.out / "metrics.jsonl", "a", buffering=1)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec, default=str) + "\n")
        prefix = "pretrain" if fields.get("pretrain") else ""
        if event == "train":
            if not prefix:
                self.train_records.append(rec)
            self._tensorboard(rec, rec["global_step"], prefix=prefix or "train")
        elif event == "eval":
            if not prefix:
                self.eval_records.append(rec)
            self._tensorboard(rec, rec.get("global_step", 0), prefix=prefix or "eval")

    def load_history(self) -> None:
        """Read earlier records of this run folder (a resumed run keeps drawing the whole curve)."""
        if not self.enabled or self.out is None or not (self.out / "metrics.jsonl").exists():
            return
        for line in (self.out / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("pretrain"):
                continue
            if rec.get("event") == "train":
                self.train_records.append(rec)
            elif rec.get("event") == "eval":
                self.eval_records.append(rec)

    # ------------------------------------------------------------------ tensorboard
    def _tensorboard(self, rec: dict[str, Any], step: int, prefix: str) -> None:
        if not self._tb_wanted or self.out is None:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb_wanted = False
                self.print("[dim]tensorboard is not installed: no event files (pip install tensorboard)[/]")
                return
            self._tb = SummaryWriter(str(self.out / "tb"))
        stage = rec.get("stage", "")
        for key in ("loss", "lr", "images_per_s", "top1", "top5", "perplexity", "bits_per_token", "kl_to_teacher",
                    "tokens_per_s", "positions_per_s"):
            if isinstance(rec.get(key), (int, float)):
                self._tb.add_scalar(f"{prefix}/{stage}/{key}", rec[key], step)
        for k, v in (rec.get("terms") or {}).items():
            self._tb.add_scalar(f"{prefix}/{stage}/term_{k}", v, step)

    # ------------------------------------------------------------------ progress
    def start_epoch(self, title: str, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        self._title, self._total, self._t0, self._done0 = title, total, time.perf_counter(), done
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False, refresh_per_second=4)
            self._progress.start()
            suite = SUITE_PROGRESS
            if suite is not None:  # kdgraph bench: one row over the whole suite, above the epoch's
                self._progress.add_task(suite.title[:40], total=suite.total, completed=suite.done, info=suite.text())
            self._task = self._progress.add_task(title, total=total, completed=done, info="")
        else:
            self._plain_next = done + max(1, total // 10)

    def update(self, done: int, info: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {number(v)}" for k, v in info.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=done, info=text)
        elif done >= self._plain_next or done == self._total:
            elapsed = time.perf_counter() - self._t0
            rate = (done - self._done0) / elapsed if elapsed > 0 else 0.0
            eta = (self._total - done) / rate if rate > 0 else float("nan")
            self.console.print(f"{self._title} {done}/{self._total}  {text}  eta {seconds(eta)}", soft_wrap=True)
            self._plain_next = done + max(1, self._total // 10)

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ------------------------------------------------------------------ plot
    def plot(self) -> Optional[Path]:
        """Draw ``curves.png``: training loss and terms per step (left), top-1 / top-5 per epoch (right)."""
        if not self.enabled or self.out is None or not self.train_records:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [r["global_step"] for r in self.train_records]
        ax1.plot(steps, [r["loss"] for r in self.train_records], label="loss", color="black", lw=1.2)
        names = sorted({k for r in self.train_records for k in (r.get("terms") or {})})
        if len(names) > 1:
            for n in names:
                ax1.plot(steps, [(r.get("terms") or {}).get(n, float("nan")) for r in self.train_records],
                         label=n, lw=0.8)
        for boundary in _stage_starts(self.train_records):
            ax1.axvline(boundary, color="gray", ls=":", lw=0.8)
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (weighted)")
        ax1.set_yscale("log" if all(r["loss"] > 0 for r in self.train_records) else "linear")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        if self.eval_records:
            x = list(range(1, len(self.eval_records) + 1))
            ax2.plot(x, [r["top1"] for r in self.eval_records], "o-", label="top-1")
            ax2.plot(x, [r["top5"] for r in self.eval_records], "s--", label="top-5")
            ax2.set_xticks(x, [f"{r['stage']}\n{r['epoch'] + 1}" if len(x) <= 12 else str(r["epoch"] + 1)
                               for r in self.eval_records], fontsize=7)
            ax2.legend(fontsize=8)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("validation accuracy (%)")
        ax2.grid(alpha=0.3)
        fig.suptitle(self.out.name)
        fig.tight_layout()
        path = self.out / "curves.png"
        tmp = self.out / ".curves.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        return path

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _stage_starts(records: list[dict[str, Any]]) -> list[int]:
    out = []
    for a, b in zip(records, records[1:]):
        if a.get("stage") != b.get("stage"):
            out.append(b["global_step"])
    return out

