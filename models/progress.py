"""Progress of long model work: events as dicts ({"stage", "done", "total", ...}) to a callback,
or tqdm bars on stderr (one per stage)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[dict[str, Any]], None]


class ProgressBars:
    """tqdm bars for the progress events (one per stage)."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, ev: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        stage = ev["stage"]
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=ev["total"], desc=stage, leave=False)
        if stage == "epoch":
            bar.update(1)
            bar.set_postfix(loss=f"{ev['train_loss']:.3f}", val_acc=f"{ev['val_acc']:.3f}",
                            best=ev["best_epoch"])
        else:
            bar.update(ev["done"] - bar.n)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def progress_fn(progress: Progress | bool | None) -> Progress | None:
    if progress is True:
        return ProgressBars()
    if progress in (None, False):
        return None
    if not callable(progress):
        raise ValueError("progress must be True, None or a callable")
    return progress


__all__ = ["Progress", "ProgressBars", "progress_fn"]
