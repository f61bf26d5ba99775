"""Everything the data pipeline needs to know, as one frozen dataclass (tyro turns it into flags)."""

from __future__ import annotations

import dataclasses
import pathlib

from eqx_pi05.cameras import ViewDropoutConfig, ViewRemoveConfig, check_exclusive
from eqx_pi05.data.episodes import Suite, selected_tasks


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # LeRobot dataset directory (the one holding meta/info.json).
    dataset: pathlib.Path
    # PaliGemma SentencePiece model (`paligemma_tokenizer.model`), or the demo's tokenizer.model.
    tokenizer: pathlib.Path
    # openpi-layout norm_stats.json: {"norm_stats": {"state": {...}, "actions": {...}}}.
    norm_stats: pathlib.Path
    action_horizon: int = 10
    max_token_len: int = 200
    # pi05_libero: False (prompt = BOS + text + "\n"); True writes the binned state into the prompt.
    discrete_state_input: bool = False
    # Global batch over all processes; each process yields batch_size // process_count samples.
    batch_size: int = 32
    seed: int = 42
    num_workers: int = 2
    shuffle: bool = True
    # None repeats forever; otherwise the loader ends after this many passes over the data.
    num_epochs: int | None = None
    # Episodes that train, chosen before shuffling and norm stats: the LIBERO suites' tasks
    # (eqx_pi05.data.episodes), or an explicit list of task strings; both empty: every episode.
    suites: tuple[Suite, ...] = ()
    tasks: tuple[str, ...] = ()
    view_dropout: ViewDropoutConfig = ViewDropoutConfig()
    view_remove: ViewRemoveConfig = ViewRemoveConfig()

    def __post_init__(self):
        check_exclusive(self.view_dropout, self.view_remove)
        selected_tasks(self.suites, self.tasks)
        for name in ("action_horizon", "max_token_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers: expected >= 0, got {self.num_workers}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs: expected None or >= 1, got {self.num_epochs}")

    @property
    def selected_tasks(self) -> tuple[str, ...] | None:
        """The task strings whose episodes train; None: every episode of the dataset."""
        return selected_tasks(self.suites, self.tasks)
