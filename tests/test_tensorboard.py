"""TensorBoard as a running job is watched: events after every epoch, each epoch once after a
resume, read back with TensorBoard's own reader."""

import types

import pytest

from mnist_jax import tensorboard as tb
from mnist_jax.config import Variant

ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def fake_stack(losses: list[float]):
    return types.SimpleNamespace(variants=(Variant("dropout"),), seeds=(3,),
                                 histories={"dropout": [{"loss": list(losses)}]},
                                 epochs_done=len(losses))


def scalars(logdir):
    acc = ea.EventAccumulator(str(logdir / "dropout" / "seed_3"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("epoch/loss")]


def test_each_epoch_is_readable_while_the_run_goes_on(tmp_path):
    live = tb.Live(tmp_path)
    live.epoch(fake_stack([0.5]))
    assert scalars(tmp_path) == [(1, 0.5)]  # flushed, the writer still open
    live.epoch(fake_stack([0.5, 0.25]))
    assert scalars(tmp_path) == [(1, 0.5), (2, 0.25)]
    live.close()


def test_after_a_resume_each_epoch_shows_once(tmp_path):
    first = tb.Live(tmp_path)
    for n in (1, 2, 3):  # epochs 2 and 3 were written, then the run was killed; the
        first.epoch(fake_stack([1.0, 2.0, 3.0][:n]))  # newest checkpoint is of epoch 1
    first.close()
    again = tb.Live(tmp_path, resumed_after=1)
    for n in (2, 3):
        again.epoch(fake_stack([1.0, 20.0, 30.0][:n]))
    again.close()
    assert scalars(tmp_path) == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_a_run_resumed_before_its_first_checkpoint_shows_each_epoch_once(tmp_path):
    """Killed after two epochs and before any checkpoint (they are made by time): the resumed
    run starts at epoch 1 again, and supersedes what the first wrote."""
    first = tb.Live(tmp_path)
    for n in (1, 2):
        first.epoch(fake_stack([1.0, 2.0][:n]))
    first.close()
    again = tb.Live(tmp_path, resumed_after=0)
    for n in (1, 2, 3):
        again.epoch(fake_stack([10.0, 20.0, 30.0][:n]))
    again.close()
    assert scalars(tmp_path) == [(1, 10.0), (2, 20.0), (3, 30.0)]

