"""Checkpoints: every leaf comes back as saved, a resumed run is the uninterrupted run, and a
damaged checkpoint is never loaded (the older one is, and the run still ends bitwise equal)."""

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnist_jax import checkpoint, fit
from mnist_jax.config import VARIANTS, TrainConfig
from mnist_jax.errors import CheckpointError, ConfigError

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
    """Digests that match but weights that are NaN were never saved by a healthy run: the
    finiteness check alone sees them (catches a `_load` without it)."""
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
    """Orbax alone would load it; unverifiable, it is set aside like a damaged one (catches a
    `_check_files` that let orbax find the digests missing: it would say 'unreadable')."""
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


# --- Each layer of the verification alone: damage that only it can see -----------------------
# The damage above is refused by whichever layer sees it first (a flipped byte: the file
# digests). Each test below leaves every other layer satisfied, so it fails when its layer is
# gone.


@pytest.fixture(scope="module")
def checkpointed(small, tmp_path_factory):
    """Epochs 1 and 2 of a run, each checkpointed, never damaged: (directory, the stack of
    epoch 2). Each test damages a copy."""
    mgr, stack = saved_run(small, tmp_path_factory.mktemp("checkpointed"), 2)
    mgr.close()
    return Path(str(mgr.directory)), stack


def copied(checkpointed, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(checkpointed[0], directory)
    return directory


def rehash(step_dir):
    """The file digests recorded afresh: the files on disk are what the record says."""
    (step_dir / checkpoint.FILE_DIGESTS).unlink()
    checkpoint._write_file_digests(step_dir)


def falls_back(directory, why):
    """Restoring from `directory` sets epoch 2 aside, saying why (the reason begins with
    `why`), and restores epoch 1."""
    mgr = checkpoint.manager(directory)
    warnings = []
    restored = checkpoint.restore(mgr, new(), warn=warnings.append)
    mgr.close()
    assert restored.epochs_done == 1 and len(warnings) == 1, warnings
    assert warnings[0].startswith(f"checkpoint {directory / '2'} is damaged ({why}"), warnings
    assert warnings[0].endswith("); set aside as 2.damaged, trying an older one"), warnings
    assert (directory / "2.damaged").is_dir() and not (directory / "2").exists()


def test_an_unreadable_record_of_the_file_digests_is_damage(checkpointed, tmp_path):
    """Every file intact but the record of their digests: catches a `_check_files` that took
    an unreadable record for an absent one (a kill before it was written) and went on."""
    directory = copied(checkpointed, tmp_path)
    (directory / "2" / checkpoint.FILE_DIGESTS).write_text('{"meta/metadata": {"size": ')
    falls_back(directory, "its file digests are unreadable (JSONDecodeError)")


def test_a_missing_file_is_damage_even_where_orbax_never_reads_it(checkpointed, tmp_path):
    """Orbax restores without meta/commit_success.txt: catches a `_check_files` that
    skipped recorded files no longer on disk."""
    directory = copied(checkpointed, tmp_path)
    (directory / "2" / "meta" / "commit_success.txt").unlink()
    falls_back(directory, "meta/commit_success.txt is missing")


def test_a_file_of_another_size_is_named_with_both_sizes(checkpointed, tmp_path):
    """A newline after the metadata's JSON (the same metadata to orbax and its digest):
    catches a `_check_files` without the size check (the SHA-256 would refuse the file, but
    not say it is truncated or grown)."""
    directory = copied(checkpointed, tmp_path)
    meta = directory / "2" / "meta" / "metadata"
    size = meta.stat().st_size
    meta.write_bytes(meta.read_bytes() + b"\n")
    falls_back(directory, f"meta/metadata has {size + 1} bytes, not {size} (truncated?)")


def test_a_file_of_the_same_size_with_other_bytes_is_damage(checkpointed, tmp_path):
    """A space of the metadata's JSON made a newline: the same size, the same metadata to
    orbax and its digest; catches a `_check_files` that compared sizes alone."""
    directory = copied(checkpointed, tmp_path)
    meta = directory / "2" / "meta" / "metadata"
    text = meta.read_text()
    assert ", " in text
    meta.write_text(text.replace(", ", ",\n", 1))
    falls_back(directory, "meta/metadata does not match its SHA-256 digest")


def test_what_orbax_cannot_read_is_damage_not_a_crash(checkpointed, tmp_path):
    """Metadata that is not JSON, its file digests recorded afresh: catches a `_load` that
    let orbax's error out of `restore` (a traceback, not the older checkpoint)."""
    directory = copied(checkpointed, tmp_path)
    (directory / "2" / "meta" / "metadata").write_text('{"epochs_done": 2,')
    rehash(directory / "2")
    falls_back(directory, "unreadable: JSONDecodeError: ")


def test_edited_metadata_with_matching_files_is_damage(checkpointed, tmp_path):
    """A loss in the history changed and the files' digests recorded afresh: catches a
    `_load` without the metadata digest."""
    directory = copied(checkpointed, tmp_path)
    damage(directory / "2", "edited history")
    rehash(directory / "2")
    falls_back(directory, "its metadata does not match its digest")


def test_a_changed_array_saved_whole_is_damage(checkpointed, tmp_path):
    """Epoch 2 saved again by orbax with one bias changed, under epoch 2's digests, and its
    file digests recorded: catches a `_load` without the array digests."""
    directory = copied(checkpointed, tmp_path)
    step = directory / "2"
    meta = json.loads((step / "meta" / "metadata").read_text())
    digests = json.loads((step / "digests" / "metadata").read_text())
    arrays = checkpoint._arrays(checkpointed[1])
    assert checkpoint.array_digests(arrays) == digests["arrays"]  # epoch 2's arrays
    state = arrays["state"]
    arrays["state"] = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf + 1e-3 if jax.tree_util.keystr(path) == "['output']['bias']"
        else leaf, state.params))
    shutil.rmtree(step)
    mgr = checkpoint.manager(directory)
    mgr.save(2, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                        meta=ocp.args.JsonSave(meta),
                                        digests=ocp.args.JsonSave(digests)))
    mgr.wait_until_finished()
    mgr.close()
    checkpoint._write_file_digests(step)
    falls_back(directory, "1 array(s) do not match their digests, e.g. "
                          "['state'].params['output']['bias']")


def test_a_recorded_array_that_is_not_restored_is_damage(checkpointed, tmp_path):
    """The digests name one array more than the restore brings back: catches a `_load` that
    compared only the digests of the arrays it restored."""
    directory = copied(checkpointed, tmp_path)
    path = directory / "2" / "digests" / "metadata"
    digests = json.loads(path.read_text())
    digests["arrays"]["['state'].extra"] = "0" * 64
    path.write_text(json.dumps(digests))
    rehash(directory / "2")
    falls_back(directory, "some array(s) do not match their digests, e.g. ['state'].extra")


def test_an_intact_checkpoint_of_other_seeds_is_refused_and_kept(checkpointed, tmp_path):
    """Every digest matches, but the run resuming it has seeds (0, 2), not (0, 1): catches a
    `restore` that loaded another run's models (the arrays have the same shapes)."""
    directory = copied(checkpointed, tmp_path)
    mgr = checkpoint.manager(directory)
    other = fit.new_stack([VARIANTS[n] for n in VARIANT_NAMES], (0, 2), CONFIG, n_train=1300)
    with pytest.raises(ConfigError) as info:
        checkpoint.restore(mgr, other, warn=pytest.fail)
    mgr.close()
    assert str(info.value) == (
        f"the checkpoint in {directory} holds variants ['l2', 'dropout'] and seeds [0, 1], "
        "not ['l2', 'dropout'] and [0, 2]")
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # nothing set aside
