"""The sweep benchmark's peer: Keras Tuner's GridSearch over the same L2 x dropout grid, with
Keras 3 on `--backend` (default jax), each trial `fit` as the study fits (Adam 1e-3, batch 128,
`validation_split=0.3`). Prints one JSON line: wall seconds from the first trial to the last,
and the best trial by its final-epoch validation accuracy (the sweep's criterion) and by Keras
Tuner's own score (its best epoch)."""

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="jax", choices=("jax", "tensorflow", "torch"))
    parser.add_argument("--l2", default="0,1e-5,1e-4,1e-3")
    parser.add_argument("--dropout", default="0,0.2,0.3,0.45")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import keras_tuner

    from mnist_jax import preprocessing
    from mnist_jax.data import load_mnist

    mnist = load_mnist(args.data_dir)
    x = preprocessing.scale(preprocessing.flatten(mnist.train_images))
    y = preprocessing.one_hot(mnist.train_labels)
    l2s = [float(v) for v in args.l2.split(",")]
    drops = [float(v) for v in args.dropout.split(",")]

    def build(hp):  # L2 on both hidden kernels, dropout after both: the sweep's default layers
        l2 = hp.Choice("l2", l2s)
        rate = hp.Choice("dropout", drops)
        layers = [keras.Input((784,))]
        for _ in range(2):
            layers.append(keras.layers.Dense(256, activation="relu",
                                             kernel_regularizer=keras.regularizers.l2(l2)))
            layers.append(keras.layers.Dropout(rate))
        layers.append(keras.layers.Dense(10, activation="softmax"))
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        return model

    with tempfile.TemporaryDirectory() as directory:
        tuner = keras_tuner.GridSearch(build, objective="val_accuracy",
                                       max_trials=len(l2s) * len(drops), seed=0,
                                       directory=directory, project_name="sweep",
                                       overwrite=True)
        t0 = time.perf_counter()
        tuner.search(x, y, epochs=args.epochs, batch_size=128, validation_split=0.3, verbose=0)
        seconds = time.perf_counter() - t0
        trials = list(tuner.oracle.trials.values())
        final = {t.trial_id: t.metrics.get_history("val_accuracy")[-1].value[0] for t in trials}
        best_final = max(trials, key=lambda t: final[t.trial_id])
        best_score = tuner.oracle.get_best_trials(1)[0]
    print(json.dumps({
        "stack": f"keras-tuner-{args.backend}", "keras": keras.__version__,
        "keras_tuner": keras_tuner.__version__, "configurations": len(trials),
        "epochs": args.epochs, "wall_seconds": seconds,
        "best_final_val_accuracy": final[best_final.trial_id],
        "best_final": best_final.hyperparameters.values,
        "best_score": best_score.score, "best_by_score": best_score.hyperparameters.values,
        "final_val_accuracy": {f"l2={t.hyperparameters.values['l2']:g} dropout="
                               f"{t.hyperparameters.values['dropout']:g}": final[t.trial_id]
                               for t in trials}}),
        flush=True)


if __name__ == "__main__":
    main()
