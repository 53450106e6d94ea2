"""Checkpoints: every leaf comes back as saved, a resumed run is the uninterrupted run, and a
damaged checkpoint is never loaded (the older one is, and the run still ends bitwise equal)."""

import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnist_jax import checkpoint, fit
from mnist_jax.config import VARIANTS, TrainConfig
from mnist_jax.errors import CheckpointError

CONFIG = TrainConfig(epochs=3)
VARIANT_NAMES = ("l2", "dropout")


@pytest.fixture(scope="module")
def small(splits):
    return fit.Splits(splits.train_images[:1000], splits.train_labels[:1000],
                      splits.val_images[:300], splits.val_labels[:300],
                      splits.test_images[:10], splits.test_labels[:10])


def new(config=CONFIG):
    return fit.new_stack([VARIANTS[n] for n in VARIANT_NAMES], (0, 1), config, n_train=1300)


@pytest.fixture(scope="module")
def uninterrupted(small):
    return fit.fit(new(), small, progress=False)


def leaves(stack):
    """Every array of a stack, by path: parameters, both moments, counts, learning rates,
    hyperparameters, the step and the raw key data."""
    tree = {"state": stack.state, "keys": jax.tree.map(jax.random.key_data, stack.keys._asdict())}
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        np.testing.assert_array_equal(la[key], lb[key], err_msg=key)
    assert a.histories == b.histories and a.epochs_done == b.epochs_done


def saved_run(small, tmp_path, epochs):
    """A run checkpointed every epoch up to `epochs`, stopped there: (manager, stack)."""
    mgr = checkpoint.manager(tmp_path / "checkpoints")
    stack = fit.fit(new(TrainConfig(epochs=epochs)), small, progress=False,
                    on_epoch_end=lambda s: checkpoint.save(mgr, s))
    return mgr, stack


def test_restore_gives_back_every_leaf_as_saved(small, tmp_path):
    """Parameters, Adam's moments and count, the learning rate, the step and the keys: a
    restore that left any of them fresh (Adam's state, say) would fail here."""
    mgr, saved = saved_run(small, tmp_path, 1)
    restored = checkpoint.restore(mgr, new())
    n_leaves = len(leaves(saved))
    assert n_leaves >= 20  # 6 params x (value, mu, nu) + counts, lr, hparams, step, keys
    assert_same(restored, saved)
    mu = restored.state.opt_state.inner_state[0].mu["hidden_1"]["kernel"]
    assert np.abs(np.asarray(mu)).max() > 0  # a fresh state would have zeros
    mgr.close()


def test_a_resumed_run_is_the_uninterrupted_run(small, tmp_path, uninterrupted):
    """Stopped after epoch 1 and resumed from its checkpoint, the run draws the batches and
    dropout masks the uninterrupted run draws: bitwise the same weights and history."""
    mgr, _ = saved_run(small, tmp_path, 1)
    resumed = fit.fit(checkpoint.restore(mgr, new()), small, progress=False)
    assert_same(resumed, uninterrupted)
    mgr.close()


def data_files(step_dir):
    files = [p for p in (step_dir / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size)


def damage(step_dir, how):
    if how == "flipped bytes":
        target = data_files(step_dir)[-1]
        data = bytearray(target.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 8):
            data[i] ^= 0xFF
        target.write_bytes(bytes(data))
    elif how == "truncated":
        target = data_files(step_dir)[-1]
        target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
    elif how == "edited history":
        meta = step_dir / "meta" / "metadata"
        record = json.loads(meta.read_text())
        record["histories"]["l2"][0]["loss"][0] += 1e-3
        meta.write_text(json.dumps(record))
    elif how == "no arrays":
        for path in sorted((step_dir / "arrays").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    else:
        raise ValueError(how)


DAMAGE = ("flipped bytes", "truncated", "edited history", "no arrays")


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_used(small, tmp_path,
                                                                         uninterrupted, how):
    mgr, _ = saved_run(small, tmp_path, 2)
    directory = tmp_path / "checkpoints"
    damage(directory / "2", how)
    warnings = []
    restored = checkpoint.restore(mgr, new(), warn=warnings.append)
    assert restored.epochs_done == 1
    assert len(warnings) == 1 and f"{directory / '2'} is damaged" in warnings[0], warnings
    assert (directory / "2.damaged").is_dir() and not (directory / "2").exists()
    # The run goes on from epoch 1, saves epoch 2 afresh and ends as if never interrupted.
    done = fit.fit(restored, small, progress=False,
                   on_epoch_end=lambda s: checkpoint.save(mgr, s))
    assert_same(done, uninterrupted)
    assert sorted(mgr.all_steps()) == [2, 3]
    mgr.close()


def test_non_finite_values_are_damage_not_divergence(small, tmp_path):
    """Digests that match but weights that are NaN were never saved by a healthy run."""
    mgr, stack = saved_run(small, tmp_path, 1)
    stack.epochs_done = 2
    stack.state = stack.state.replace(params=jax.tree.map(lambda a: a * np.nan,
                                                          stack.state.params))
    checkpoint.save(mgr, stack)
    warnings = []
    restored = checkpoint.restore(mgr, new(), warn=warnings.append)
    assert restored.epochs_done == 1 and "non-finite" in warnings[0]
    mgr.close()


def test_no_intact_checkpoint_says_so_and_what_to_do(small, tmp_path):
    mgr, _ = saved_run(small, tmp_path, 2)
    directory = tmp_path / "checkpoints"
    damage(directory / "1", "truncated")
    damage(directory / "2", "flipped bytes")
    with pytest.raises(CheckpointError) as info:
        checkpoint.restore(mgr, new(), warn=lambda line: None)
    message = str(info.value)
    assert f"no intact checkpoint in {directory}" in message and "--overwrite" in message
    assert "epoch 2:" in message and "epoch 1:" in message and "\n" not in message
    mgr.close()


def test_a_checkpoint_without_digests_is_not_trusted(small, tmp_path, caplog):
    """Orbax alone would load it; unverifiable, it is set aside like a damaged one."""
    mgr, stack = saved_run(small, tmp_path, 1)
    stack.epochs_done = 2
    mgr.save(2, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(checkpoint._arrays(stack)),
        meta=ocp.args.JsonSave(checkpoint._meta(stack))))
    mgr.wait_until_finished()
    with caplog.at_level(logging.WARNING, logger="mnist_jax.checkpoint"):
        restored = checkpoint.restore(mgr, new())
    assert restored.epochs_done == 1
    assert "checkpoints/2 is damaged (it records no digests" in caplog.text
    mgr.close()


def test_a_kill_before_the_file_digests_leaves_a_verified_checkpoint(small, tmp_path):
    """SIGKILL between orbax's commit and the file digests beside it: the checkpoint is kept
    and still verified by the digests committed with it (a damaged one is still refused)."""
    mgr, saved = saved_run(small, tmp_path, 2)
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        (directory / str(step) / checkpoint.FILE_DIGESTS).unlink()
    damage(directory / "2", "edited history")
    warnings = []
    restored = checkpoint.restore(mgr, new(), warn=warnings.append)
    assert restored.epochs_done == 1 and "metadata does not match its digest" in warnings[0]
    mgr.close()


def test_what_orbax_hands_back_is_checked_too(small, tmp_path, monkeypatch):
    """Intact files are not enough: the metadata and every array are checked against their
    own digests after orbax has read them (here orbax is made to return other values)."""
    mgr, _ = saved_run(small, tmp_path, 2)
    real = mgr.restore

    def tampered(step, args):
        out = real(step, args=args)
        if step == 2:
            out["arrays"]["state"].params["output"]["bias"] += 1e-6
        return out

    monkeypatch.setattr(mgr, "restore", tampered)
    warnings = []
    restored = checkpoint.restore(mgr, new(), warn=warnings.append)
    assert restored.epochs_done == 1
    assert "do not match their digests, e.g. ['state'].params['output']['bias']" in warnings[0]
    mgr.close()
