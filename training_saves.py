"""Failed saves during fine-tuning (a checkpoint, the final model, the learning curve): one line
that says what was being written, where, the OS reason, why nothing half-written will be used,
and the command that resumes the run (utils.saving does the wording for every script).
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from transformers import Trainer

from utils import SaveError, rerun_command, resume_hint, saving


def training_resume_hint(output_dir: str | os.PathLike) -> Callable[[], str]:
    """The end of a failed save's line in a training run: the same command, resumed."""
    return lambda: (f"resume with: {rerun_command(resume_from_checkpoint='true')} (it continues from the newest "
                    f"complete checkpoint in {output_dir}, or starts over where there is none)")


def with_save_errors(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` whose training and checkpoint saves end a failed write with the one line."""

    class SaveErrorTrainer(trainer_class):
        def train(self, *args, **kwargs):
            with resume_hint(training_resume_hint(self.args.output_dir)):
                return super().train(*args, **kwargs)

        def _save_checkpoint(self, model, trial):
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            kept = (f"{folder.name} is incomplete: the Trainer writes its trainer_state.json last, "
                    "and a resume skips a checkpoint without one")
            with saving("the checkpoint", folder, kept):
                super()._save_checkpoint(model, trial)

    return SaveErrorTrainer


def final_save_errors(save_final: Callable) -> Callable:
    """Wraps finetune.save_final(trainer, output_dir, ...): a failed write of the final model ends
    with the one line, after the partial copy in <output_dir>/.final.tmp is removed."""

    @functools.wraps(save_final)
    def wrapped(trainer: Trainer, output_dir: str, *args, **kwargs):
        tmp = Path(output_dir) / ".final.tmp"
        kept = (f"it is written to {tmp.name}, removed now, and published with config.json last; "
                f"{output_dir} has no config.json, so nothing takes it for a finished model")
        with _removing_on_failure(tmp, trainer.args.should_save), resume_hint(training_resume_hint(output_dir)), \
                saving("the final model", output_dir, kept):
            return save_final(trainer, output_dir, *args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _removing_on_failure(folder: Path, remove: bool) -> Iterator[None]:
    try:
        yield
    except SaveError:
        if remove:
            shutil.rmtree(folder, ignore_errors=True)  # gives back the space the partial copy held
        raise
