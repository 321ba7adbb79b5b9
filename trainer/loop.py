"""The training loop every recipe runs, the state its checkpoints hold, and the publish-once rule.

    training = Training(model, optimizer, ema, run, checkpoint_dir)
    training.resume(RESUMABLE_CHANGES)             # with --resume: continue where the last run stopped
    fit(training, Epochs(...))                     # the recipe's task: its unit of training and its evaluation
    publish_once(training, lambda: publish(...))   # unless the resumed checkpoint is published already

`fit` is the control flow and its bookkeeping: one unit of training after another (an epoch in `trainer/train.py`, an
optimizer step in `trainer/photo.py`) while the task says another fits the run's length and time budget; after each,
the evaluation goes into the history and the log when one is due, and a checkpoint is saved when one is due. What a
unit is, how it is evaluated and when either is due is the recipe's own: its `Task`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.engine import check_resumable, logfmt
from trainer.recipe import EMA

log = logging.getLogger("trainer.loop")


@dataclass
class Training:
    """One model's training: what it trains (the model, its optimizer, its EMA if any, and the run setup that the
    manifest records and a resume must match), where it checkpoints, and where it stands."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    run: dict
    checkpoint_dir: Path | None
    log_fields: dict = field(default_factory=dict)  # what every line the loop logs about it carries
    history: list[dict] = field(default_factory=list)
    step: int = 0  # optimizer steps taken, over resumed runs too
    saves: int = 0  # checkpoints saved in checkpoint_dir, over resumed runs too: each is numbered by it
    published: int | None = None  # the version the weights were published as; None while they are new
    saved_at: float = 0.0  # time.monotonic() of the last checkpoint, or of the start of the loop

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and published: the EMA where there is one."""
        return self.ema.averaged if self.ema is not None else self.model

    def resume(self, resumable: set[str], saved_setup: Callable[[dict], dict] = lambda run: run) -> bool:
        """Continue from the checkpoint in checkpoint_dir, if there is one of the same experiment (the run setup, up to
        the `resumable` recipe entries; `saved_setup` reads the checkpoint's setup as today's recipe would write it):
        its weights, optimizer state and EMA are loaded, and its history, step, count and published version taken
        over. False where there is no checkpoint."""
        checkpoint = load_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            log.info("event=resume checkpoint_dir=%s found=none starting=fresh", self.checkpoint_dir)
            return False
        check_resumable(saved_setup(checkpoint.run), self.run, resumable, self.checkpoint_dir)
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        if self.ema is not None:
            self.ema.averaged.load_state_dict(checkpoint.ema)
        self.history, self.step, self.saves = checkpoint.history, checkpoint.step, checkpoint.epoch
        self.published = checkpoint.published_version
        log.info("event=resume checkpoint_dir=%s epoch=%d step=%d", self.checkpoint_dir, checkpoint.epoch, checkpoint.step)
        return True

    def save(self) -> None:
        """A checkpoint in checkpoint_dir of where training stands; the weights in it are new (not yet published)."""
        self.saves += 1
        save_checkpoint(self.checkpoint_dir, Checkpoint(
            epoch=self.saves, step=self.step, history=self.history, run=self.run, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), ema=self.ema.averaged.state_dict() if self.ema is not None else None))
        self.published = None
        self.saved_at = time.monotonic()


class Task:
    """A recipe's part of the loop: `fits`, `train` and `evaluation` are its own; unless it says otherwise, an
    evaluation and a checkpoint follow every unit."""

    event: str  # the event of each evaluation's log line

    def fits(self, training: Training) -> bool:
        """Whether another unit of training fits the run's length and time budget (the same answer on every process)."""
        raise NotImplementedError

    def train(self, training: Training) -> None:
        """One unit of training (an epoch, a step), on every process; it advances training.step."""
        raise NotImplementedError

    def evaluation_due(self, training: Training) -> bool:
        """Whether the unit just trained is evaluated."""
        return True

    def evaluation(self, training: Training) -> dict:
        """The history entry of the unit just trained, with its evaluation."""
        raise NotImplementedError

    def checkpoint_due(self, training: Training) -> bool:
        """Whether a checkpoint follows the unit just trained."""
        return True

    def resume_point(self, training: Training) -> dict:
        """The history entry of a checkpoint that comes without an evaluation: where training stands, which a resume
        continues from."""
        raise NotImplementedError


def fit(training: Training, task: Task, *, is_main: bool = True) -> None:
    """Train unit after unit while `task` fits another. After each, on the main process (under DDP the one that records
    and saves): the evaluation, when one is due, goes into the history and the log; a checkpoint is saved when one is
    due, with the task's resume point in the history where no evaluation came with it."""
    training.saved_at = time.monotonic()  # the time between checkpoints counts from here
    while task.fits(training):
        task.train(training)
        if not is_main:
            continue
        evaluated = task.evaluation_due(training)
        if evaluated:
            training.history.append(task.evaluation(training))
            log.info("event=%s %s", task.event, logfmt({**training.log_fields, **training.history[-1]}))
        if training.checkpoint_dir is not None and task.checkpoint_due(training):
            if not evaluated:
                training.history.append(task.resume_point(training))
            training.save()


def publish_once(training: Training, publish: Callable[[], int]) -> int:
    """Publish the trained weights with `publish` and return the version, unless they are a resumed checkpoint's that
    was published already (nothing trained since): then that version."""
    if training.published is not None:
        log.info("event=skip %s", logfmt({**training.log_fields, "reason": "already_published", "version": training.published}))
        return training.published
    return publish()
