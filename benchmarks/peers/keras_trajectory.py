"""Records Keras 3's own training trajectories for the fidelity tests (needs the [peers] extra).

    KERAS_BACKEND=jax python -m benchmarks.peers.keras_trajectory

From mnist_jax's initial weights (seed 0) and recorded batches of 128 from the first 42,000
training images (Keras's validation_split=0.3), `train_on_batch` with Keras's Adam(1e-3) on
the MLP 784-256-256-10: baseline and the `l2` variant (l2(0.001) on hidden_1), each with both
loss forms. Keras on JAX computes both: a linear output with
`CategoricalCrossentropy(from_logits=True)` is what Keras on TensorFlow computes for a softmax
output ('logits'); a softmax output with `CategoricalCrossentropy()` clips the probabilities
('clipped'). Writes tests/data/keras_trajectories.npz: every step's loss, and the weights after
`WEIGHTS_AT` steps; the tests replay it with no Keras installed.

    KERAS_BACKEND=jax python -m benchmarks.peers.keras_trajectory --adamw

records Keras's decoupled weight decay instead, on the first `ADAMW_STEPS` of the same batches
(baseline, 'logits'): `AdamW(1e-3, weight_decay=...)` decaying every trainable variable (Keras's
default) or the kernels only (`exclude_from_weight_decay(var_names=["bias"])`), and
`Adam(1e-3, weight_decay=0.004)`, into tests/data/keras_adamw_trajectories.npz. It first checks
on one step of a tiny layer that Keras decays as docs/fidelity.md says.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

STEPS = 2000  # about six epochs of 329 steps: long enough to see float noise grow
ADAMW_STEPS = 200  # the tests replay 100; the first epoch's batches, so a prefix of STEPS's
WEIGHTS_AT = 100
BATCH = 128
N_FIT = 42000
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Run:
    """One recorded run: the model (variant, loss form) and Keras's optimizer for it."""

    variant: str
    form: str
    optimizer: str = "Adam"  # a keras.optimizers class, built with LEARNING_RATE
    weight_decay: float | None = None
    decay_biases: bool = True  # Keras's default decays every trainable variable


RUNS = {
    "baseline_logits": Run("baseline", "logits"),
    "l2_logits": Run("l2", "logits"),
    "baseline_clipped": Run("baseline", "clipped"),
    "l2_clipped": Run("l2", "clipped"),
}
ADAMW_RUNS = {  # 0.004 is AdamW's default weight_decay
    "adamw_0.004_all": Run("baseline", "logits", "AdamW", 0.004),
    "adamw_0.004_kernels": Run("baseline", "logits", "AdamW", 0.004, decay_biases=False),
    "adamw_0.1_all": Run("baseline", "logits", "AdamW", 0.1),
    "adamw_0.1_kernels": Run("baseline", "logits", "AdamW", 0.1, decay_biases=False),
    "adam_0.004_all": Run("baseline", "logits", "Adam", 0.004),  # the same code as AdamW's
}
DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
OUT = DATA / "keras_trajectories.npz"
ADAMW_OUT = DATA / "keras_adamw_trajectories.npz"


def initial_weights():
    """mnist_jax's initial parameters for seed 0, as Keras's [W1, b1, W2, b2, W3, b3]."""
    import jax
    import numpy as np

    from mnist_jax import steps
    from mnist_jax.config import dense_names
    from mnist_jax.model import MLP

    init_key, _, _ = steps.run_keys(0)
    params = MLP().init(init_key, jax.numpy.zeros((1, 784), jax.numpy.float32))["params"]
    return [np.asarray(params[name][p]) for name in dense_names((256, 256))
            for p in ("kernel", "bias")]


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def draw_batches(steps: int):
    """Batches as Keras's fit draws them: a fresh permutation each epoch, the last one partial
    (42,000 = 328 x 128 + 16), so the replay covers partial batches too."""
    import numpy as np

    rng = np.random.default_rng(0)
    batches = []
    while len(batches) < steps:
        perm = rng.permutation(N_FIT)
        batches += [perm[i:i + BATCH] for i in range(0, N_FIT, BATCH)]
    return batches[:steps]


def make_optimizer(run: Run):
    import keras

    decay = {} if run.weight_decay is None else {"weight_decay": run.weight_decay}
    optimizer = getattr(keras.optimizers, run.optimizer)(learning_rate=LEARNING_RATE, **decay)
    if not run.decay_biases:
        optimizer.exclude_from_weight_decay(var_names=["bias"])  # re.search on variable.name
    return optimizer


def check_weight_decay() -> None:
    """One AdamW step on a tiny Dense layer against NumPy: w*(1 - wd*lr) - lr*adam(g), and a
    bias left out of the decay stays put when its gradient is zero (Adam's step is then 0)."""
    import keras
    import numpy as np

    wd, b1, b2, eps = 0.1, 0.9, 0.999, 1e-7
    w = np.array([[0.5, -1.5, 3.0]], np.float32)
    b = np.array([0.25, -2.0, 1.0], np.float32)
    g = np.array([[0.3, -2e-3, 0.0]], np.float32)
    m, v = (1 - b1) * g.astype(np.float64), (1 - b2) * g.astype(np.float64) ** 2
    adam = np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + eps)  # Keras's Adam, step 1, per lr
    for decay_biases in (True, False):
        layer = keras.layers.Dense(3)
        layer.build((None, 1))
        layer.set_weights([w, b])
        optimizer = make_optimizer(Run("baseline", "logits", "AdamW", wd, decay_biases))
        optimizer.apply([g, np.zeros_like(b)], layer.trainable_variables)
        new_w, new_b = layer.get_weights()
        np.testing.assert_allclose(new_w, w * (1 - wd * LEARNING_RATE) - LEARNING_RATE * adam,
                                   rtol=1e-6)
        if decay_biases:
            np.testing.assert_allclose(new_b, b * (1 - wd * LEARNING_RATE), rtol=1e-7)
        else:
            np.testing.assert_array_equal(new_b, b)
    print("checked: Keras's AdamW step is w*(1 - wd*lr) - lr*adam(g); excluded biases stay put")


def record(run: Run, weights, x, y, batches):
    """Keras's `train_on_batch` over `batches`: every step's loss, the weights after
    `WEIGHTS_AT` steps, and which of [W1, b1, W2, b2, W3, b3] Keras's optimizer decays."""
    import keras
    import numpy as np

    from mnist_jax.config import VARIANTS

    variant = VARIANTS[run.variant].at_depth((256, 256))
    layers = [keras.Input((784,))]
    for name in ("hidden_1", "hidden_2"):
        reg = keras.regularizers.l2(variant.l2) if name in variant.l2_layers else None
        layers.append(keras.layers.Dense(256, activation="relu", kernel_regularizer=reg))
    layers.append(keras.layers.Dense(10, activation="softmax" if run.form == "clipped" else None))
    model = keras.Sequential(layers)
    optimizer = make_optimizer(run)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(from_logits=run.form == "logits"))
    model.set_weights(weights)
    assert [v.path for v in model.trainable_variables] == [v.path for v in model.weights]
    # What `_apply_weight_decay` consults, variable by variable (it returns early without decay).
    decayed = np.array([run.weight_decay is not None and optimizer._use_weight_decay(v)
                        for v in model.trainable_variables])
    losses, at = [], None
    for step, idx in enumerate(batches, start=1):
        losses.append(float(model.train_on_batch(x[idx], y[idx])))
        if step == WEIGHTS_AT:
            at = [np.asarray(w) for w in model.get_weights()]
        if step % 500 == 0 or step == len(batches):
            print(f"  {run.variant}/{run.form}/{run.optimizer}(weight_decay={run.weight_decay}"
                  f"{'' if run.decay_biases else ', kernels only'}): step {step}, "
                  f"loss {losses[-1]:.6f}", flush=True)
    return np.asarray(losses, np.float32), at, decayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--adamw", action="store_true",
                        help=f"record ADAMW_RUNS ({ADAMW_STEPS} steps) into {ADAMW_OUT.name}")
    parser.add_argument("--steps", type=int, default=None, help="default: STEPS or ADAMW_STEPS")
    parser.add_argument("--out", type=Path, default=None, help="default: OUT or ADAMW_OUT")
    args = parser.parse_args()
    runs = ADAMW_RUNS if args.adamw else RUNS
    steps = args.steps or (ADAMW_STEPS if args.adamw else STEPS)
    out_path = args.out or (ADAMW_OUT if args.adamw else OUT)
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        sys.exit("run with KERAS_BACKEND=jax: Keras on JAX records both loss forms")
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # full float32 everywhere
    import keras
    import numpy as np

    from mnist_jax import preprocessing
    from mnist_jax.data import load_mnist

    if args.adamw:
        check_weight_decay()
    mnist = load_mnist(args.data_dir)
    x = preprocessing.scale(preprocessing.flatten(mnist.train_images))[:N_FIT]
    y = preprocessing.one_hot(mnist.train_labels)[:N_FIT]
    batches = draw_batches(steps)
    flat = np.concatenate(batches).astype(np.int32)
    if out_path != OUT and OUT.exists():  # the same batches as the Adam recording's
        with np.load(OUT) as adam:
            n = min(len(flat), len(adam["batches"]))
            assert np.array_equal(adam["batches"][:n], flat[:n]), "batches differ from OUT's"
    weights = initial_weights()
    out = {"init_sha256": np.array(digest(weights)), "keras": np.array(keras.__version__),
           "jax": np.array(jax.__version__), "weights_at": np.array(WEIGHTS_AT),
           "batch_sizes": np.array([len(b) for b in batches], np.int32), "batches": flat}
    for name, run in runs.items():
        losses, at, decayed = record(run, weights, x, y, batches)
        out[f"{name}/losses"] = losses
        for i, w in enumerate(at):
            out[f"{name}/weights_{i}"] = w
        if run.weight_decay is not None:
            out[f"{name}/weight_decay"] = np.array(run.weight_decay, np.float32)
            out[f"{name}/decayed"] = decayed
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path} (Keras {keras.__version__} on JAX {jax.__version__})")


if __name__ == "__main__":
    main()
