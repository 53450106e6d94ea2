"""The study's recipe in Keras 3: `python -m benchmarks.peers.keras_peer --backend jax`.

Prints one JSON line per variant: fit seconds (20 epochs with validation), evaluate seconds,
test loss and accuracy. The backend is chosen before Keras is imported, as Keras requires.
`--seed` seeds Keras's initialisation, shuffling and dropout; `--output logits` puts a linear
output under `CategoricalCrossentropy(from_logits=True)`, which on every backend computes what
Keras on TensorFlow computes for the study's softmax output (`--output softmax`, the default,
is the clipped cross-entropy on JAX and PyTorch).
"""

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True, choices=("jax", "tensorflow", "torch"))
    parser.add_argument("--variants", default="baseline,l2,dropout,l2_dropout")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", choices=("softmax", "logits"), default="softmax")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"),
                        default="float32", help="Keras's dtype policy")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    from mnist_jax import preprocessing
    from mnist_jax.config import VARIANTS
    from mnist_jax.data import load_mnist

    keras.mixed_precision.set_global_policy(args.precision)
    mnist = load_mnist(args.data_dir)
    x = preprocessing.scale(preprocessing.flatten(mnist.train_images))
    y = preprocessing.one_hot(mnist.train_labels)
    x_test = preprocessing.scale(preprocessing.flatten(mnist.test_images))
    y_test = preprocessing.one_hot(mnist.test_labels)
    for name in args.variants.split(","):
        variant = VARIANTS[name].at_depth((256, 256))
        keras.utils.set_random_seed(args.seed)
        layers = [keras.Input((784,))]
        for layer in ("hidden_1", "hidden_2"):
            reg = (keras.regularizers.l2(variant.l2) if layer in variant.l2_layers else None)
            layers.append(keras.layers.Dense(256, activation="relu", kernel_regularizer=reg))
            if layer in variant.dropout_layers:
                layers.append(keras.layers.Dropout(variant.dropout))
        logits = args.output == "logits"
        # The output in float32, as Keras's mixed-precision guide says to.
        layers.append(keras.layers.Dense(10, activation=None if logits else "softmax",
                                         dtype="float32"))
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=logits),
                      metrics=["accuracy"])
        t0 = time.perf_counter()
        history = model.fit(x, y, epochs=args.epochs, batch_size=128, validation_split=0.3,
                            verbose=0)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=128, verbose=0)
        eval_s = time.perf_counter() - t0
        print(json.dumps({"stack": f"keras-{args.backend}", "variant": name,
                          "fit_seconds": fit_s, "evaluate_seconds": eval_s,
                          "test_loss": float(loss), "test_accuracy": float(accuracy),
                          "val_accuracy": float(history.history["val_accuracy"][-1]),
                          "keras": keras.__version__, "epochs": args.epochs,
                          "seed": args.seed, "output": args.output,
                          "precision": args.precision}), flush=True)
    del np
    sys.exit(0)


if __name__ == "__main__":
    main()
