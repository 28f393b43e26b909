"""What a run tells its user: a console progress line, metrics.jsonl and TensorBoard.

Only process 0 reports; other processes get a :class:`Reporter` that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _keep_history_up_to(path: pathlib.Path, step: int) -> None:
    """Drops the records of ``metrics.jsonl`` past ``step`` (logged after the checkpoint a
    run resumes from, by the run that was interrupted) and a torn last line, atomically:
    the file then holds one history, whatever was killed when."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


class Reporter:
    """Logs metrics every few steps.

    ``log(step, metrics)`` takes host scalars. It adds ``samples_per_sec`` (since the
    previous log) and writes: a progress line to the console (rewritten in place on a
    terminal), one JSON object per call to ``<workdir>/metrics.jsonl``, and TensorBoard
    scalars under ``<workdir>/tensorboard``. A run resumed at step ``start_step`` first
    drops what the interrupted run logged after that step, from both.
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        total_steps: int,
        start_step: int,
        global_batch: int,
        enabled: bool = True,
        tensorboard: bool = True,
        stream=None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.stream = stream or sys.stdout
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = (start_step, time.perf_counter())
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        path = workdir / "metrics.jsonl"
        _keep_history_up_to(path, start_step)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the events of earlier sessions from this step
            # on, so a resumed run's curves have no doubled steps.
            self._writer = SummaryWriter(
                str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )

    def reset_clock(self, step: int) -> None:
        """Start the throughput clock now (e.g. after compilation)."""
        self._last = (step, time.perf_counter())

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        last_step, last_time = self._last
        self._last = (step, now)
        rate = (step - last_step) * self.global_batch / max(now - last_time, 1e-9)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "samples_per_sec": rate}
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step":
                    self._writer.add_scalar(f"train/{name}", value, step)
            self._writer.flush()
        eta = (self.total_steps - step) * self.global_batch / rate if rate > 0 else float("inf")
        width = len(str(self.total_steps))
        line = (
            f"[{step:>{width}}/{self.total_steps}] {100 * step / self.total_steps:5.1f}% "
            f"loss {record['loss']:.4f}  acc {record.get('accuracy', float('nan')):.3f}  "
            f"lr {record.get('lr', float('nan')):.3g}  {rate:,.0f} img/s  ETA {_duration(eta)}"
        )
        if self._tty:
            self.stream.write("\r" + line + ("\n" if step >= self.total_steps else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return record

    def log_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Evaluation results ``{set name: {metric: value}}``: one metrics.jsonl record with
        keys ``eval/<set>/<metric>``, the same TensorBoard tags."""
        record = {"step": step}
        for name, values in results.items():
            record.update({f"eval/{name}/{k}": float(v) for k, v in values.items()})
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for tag, value in record.items():
                if tag != "step":
                    self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def message(self, text: str) -> None:
        """A line of its own (never overwritten by the progress line)."""
        if self.enabled:
            self.stream.write(("\n" if self._tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
