"""The project's exceptions: each message names the problem and how to fix it."""


class MnistJaxError(Exception):
    """A problem the user can fix; the message says how. The CLI prints it without a traceback."""


class DataError(MnistJaxError):
    """MNIST could not be delivered, or what was delivered is not the canonical MNIST."""


class ConfigError(MnistJaxError):
    """A setting is out of range or inconsistent; raised before any work starts."""


class TrainingDiverged(MnistJaxError):  # noqa: N818 - a state, like StopIteration
    """The loss became non-finite; training stopped and the last good checkpoint was kept."""

    def __init__(self, message: str, *, variant: str, epoch: int, step: int):
        super().__init__(message)
        self.variant = variant
        self.epoch = epoch
        self.step = step


class Interrupted(MnistJaxError):  # noqa: N818
    """Ctrl-C or SIGTERM (preemption): the epoch in flight was finished and checkpointed; the
    run can be resumed. `signum` is the signal that asked for it."""

    def __init__(self, message: str, *, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class StopNow(KeyboardInterrupt):  # noqa: N818 - like KeyboardInterrupt, escapes `except Exception`
    """A second Ctrl-C or SIGTERM: stop at once; the newest checkpoint is kept."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class WriteError(MnistJaxError):
    """A checkpoint or result could not be written (disk full, I/O error); what was written
    before is intact."""


class CheckpointError(MnistJaxError):
    """No intact checkpoint to resume from; the message names the directory and what to do."""
