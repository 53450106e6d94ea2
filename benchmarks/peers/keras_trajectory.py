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
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

STEPS = 2000  # about six epochs of 329 steps: long enough to see float noise grow
WEIGHTS_AT = 100
BATCH = 128
N_FIT = 42000
RUNS = {  # name: (variant, loss form)
    "baseline_logits": ("baseline", "logits"),
    "l2_logits": ("l2", "logits"),
    "baseline_clipped": ("baseline", "clipped"),
    "l2_clipped": ("l2", "clipped"),
}
OUT = Path(__file__).resolve().parents[2] / "tests" / "data" / "keras_trajectories.npz"


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


def record(variant_name: str, form: str, weights, x, y, batches):
    import keras
    import numpy as np

    from mnist_jax.config import VARIANTS

    variant = VARIANTS[variant_name].at_depth((256, 256))
    layers = [keras.Input((784,))]
    for name in ("hidden_1", "hidden_2"):
        reg = keras.regularizers.l2(variant.l2) if name in variant.l2_layers else None
        layers.append(keras.layers.Dense(256, activation="relu", kernel_regularizer=reg))
    layers.append(keras.layers.Dense(10, activation="softmax" if form == "clipped" else None))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=form == "logits"))
    model.set_weights(weights)
    losses, at = [], None
    for step, idx in enumerate(batches, start=1):
        losses.append(float(model.train_on_batch(x[idx], y[idx])))
        if step == WEIGHTS_AT:
            at = [np.asarray(w) for w in model.get_weights()]
        if step % 500 == 0:
            print(f"  {variant_name}/{form}: step {step}, loss {losses[-1]:.6f}", flush=True)
    return np.asarray(losses, np.float32), at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        sys.exit("run with KERAS_BACKEND=jax: Keras on JAX records both loss forms")
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # full float32 everywhere
    import keras
    import numpy as np

    from mnist_jax import preprocessing
    from mnist_jax.data import load_mnist

    mnist = load_mnist(args.data_dir)
    x = preprocessing.scale(preprocessing.flatten(mnist.train_images))[:N_FIT]
    y = preprocessing.one_hot(mnist.train_labels)[:N_FIT]
    # Batches as Keras's fit draws them: a fresh permutation each epoch, the last one partial
    # (42,000 = 328 x 128 + 16), so the replay covers partial batches too.
    rng = np.random.default_rng(0)
    batches = []
    while len(batches) < STEPS:
        perm = rng.permutation(N_FIT)
        batches += [perm[i:i + BATCH] for i in range(0, N_FIT, BATCH)]
    batches = batches[:STEPS]
    weights = initial_weights()
    out = {"init_sha256": np.array(digest(weights)), "keras": np.array(keras.__version__),
           "jax": np.array(jax.__version__), "weights_at": np.array(WEIGHTS_AT),
           "batch_sizes": np.array([len(b) for b in batches], np.int32),
           "batches": np.concatenate(batches).astype(np.int32)}
    for name, (variant, form) in RUNS.items():
        losses, at = record(variant, form, weights, x, y, batches)
        out[f"{name}/losses"] = losses
        for i, w in enumerate(at):
            out[f"{name}/weights_{i}"] = w
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} (Keras {keras.__version__} on JAX {jax.__version__})")


if __name__ == "__main__":
    main()
