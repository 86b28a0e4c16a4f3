"""What a training run prints: one line per epoch (rank 0) and a summary at the end.

Plain strings, no Ray: the Ray Train worker prints `epoch_line`, the commands print
`run_summary`.
"""

from __future__ import annotations


def duration(seconds: float) -> str:
    """12.3 -> '12 s', 75 -> '1 min 15 s', 3725 -> '1 h 02 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def epoch_line(metrics: dict, epochs: int, seconds_left: float | None) -> str:
    """`metrics` as `loop.epoch_metrics` reports them; `seconds_left` None when unknown."""
    parts = [f"epoch {metrics['epoch']}/{epochs}", f"loss {metrics['loss']:.4f}"]
    if "miou" in metrics:
        parts.append(f"miou {100 * metrics['miou']:.2f}%")
    parts += [f"{metrics['images_per_s']:.1f} images/s",
              f"input wait {metrics['input_wait_s']:.1f} of {metrics['epoch_time_s']:.1f} s"]
    if seconds_left is not None:
        parts.append(f"time left {duration(seconds_left)}")
    return " | ".join(parts)


def seconds_left(started: float, now: float, epochs_done: int, epochs_left: int) -> float | None:
    """Remaining time at the mean pace of the epochs this attempt has run (validation and
    checkpoints included)."""
    if epochs_done < 1:
        return None
    return (now - started) / epochs_done * epochs_left


def run_summary(method: str, metrics: dict, seconds: float, run: str, checkpoint: str | None) -> str:
    """The lines `wsss train` ends with."""
    score = ""
    if "miou" in metrics:
        score = f", miou {100 * metrics['miou']:.2f}%"
        if "threshold" in metrics:
            score += f" (background threshold {metrics['threshold']:.2f})"
    lines = [f"trained {method}: {metrics.get('epoch', '?')} epochs in {duration(seconds)}, "
             f"loss {metrics.get('loss', float('nan')):.4f}{score}",
             f"  run:        {run} (config.toml: the resolved config, `--config` repeats it)",
             f"  checkpoint: {checkpoint or 'none'}"]
    return "\n".join(lines)
