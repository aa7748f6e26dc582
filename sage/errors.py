"""Every error SAGE raises on purpose. Each message says what was wrong, where (file, task, key)
and what to do; the entry scripts print it and exit with status 2 (bad input) or 1 (a run that
cannot go on). A leaf module: it imports nothing, so any module can raise these."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and key."""


class ARCDataError(ValueError):
    """Malformed ARC input. The message names the file, task, pair and problem."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message names the path."""


class TeacherError(RuntimeError):
    """The teacher cannot be built: missing or wrong weights or tokenizer. The message says what to do."""


class FeatureCacheError(RuntimeError):
    """A feature cache is missing, incomplete, damaged or does not match the config."""


class EvaluationError(RuntimeError):
    """An evaluation that cannot run as asked; the message says what, where, and what to do."""


class RunLogError(ValueError):
    """A run's log that resuming reads back (metrics.jsonl) is damaged; the message names the file and line."""


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or out of memory at one example); the message says what to do."""


class TestOutputVisible(ValueError):
    """Test-time training was handed a task whose test outputs are still there."""

    __test__ = False  # not a pytest test class, despite the name


# What a user can fix by changing a command, a config or a file: the scripts exit with status 2.
INPUT_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, ARCDataError, CheckpointError, TeacherError, FeatureCacheError, EvaluationError, RunLogError,
)
