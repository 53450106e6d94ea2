"""The study's recipe in PyTorch: `python -m benchmarks.peers.torch_peer [--compile]`.

784-256-256-10 with Glorot-uniform kernels and zero biases, ReLU, dropout after the hidden
layers named by the variant, L2 as c * sum(W**2) added to the loss (Keras's l2), Adam with
lr 1e-3, b1 0.9, b2 0.999, eps 1e-7, batch 128 with a fresh shuffle every epoch and the
partial last batch kept, the last 30% of the training set held out and evaluated every
epoch, 20 epochs. Prints one JSON line per variant, as keras_peer does. Runs on CUDA when
PyTorch sees a GPU (the data moved there once, the shuffle drawn there), else on the CPU.
"""

import argparse
import json
import time


def run_variant(variant, data, epochs: int, compile_step: bool, device: str) -> dict:
    import torch
    from torch import nn

    x, y, x_val, y_val, x_test, y_test = data
    torch.manual_seed(0)
    layers, penalised = [], []
    for i, layer in enumerate(("hidden_1", "hidden_2", "output")):
        linear = nn.Linear(784 if i == 0 else 256, 10 if layer == "output" else 256)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if layer in variant.l2_layers:
            penalised.append(linear.weight)
        if layer != "output":
            layers.append(nn.ReLU())
            if layer in variant.dropout_layers:
                layers.append(nn.Dropout(variant.dropout))
    model = nn.Sequential(*layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()

    def penalty():
        return sum(variant.l2 * w.square().sum() for w in penalised)

    def train_step(xb, yb):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb) + penalty()
        loss.backward()
        optimizer.step()
        return loss

    def evaluate(xs, ys):
        model.eval()
        with torch.no_grad():
            logits = model(xs)
            accuracy = (logits.argmax(1) == ys).float().mean().item()
            loss = float(loss_fn(logits, ys) + penalty())
        model.train()
        return loss, accuracy

    step = torch.compile(train_step) if compile_step else train_step
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device)
        for start in range(0, len(x), 128):
            idx = order[start:start + 128]
            step(x[idx], y[idx])
        _, val_accuracy = evaluate(x_val, y_val)  # .item(): waits for the device
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_loss, test_accuracy = evaluate(x_test, y_test)
    return {"stack": "torch-compile" if compile_step else "torch-eager", "variant": variant.name,
            "fit_seconds": fit_s, "evaluate_seconds": time.perf_counter() - t0,
            "test_loss": test_loss, "test_accuracy": test_accuracy,
            "val_accuracy": val_accuracy, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="torch.compile the train step")
    parser.add_argument("--variants", default="baseline,l2,dropout,l2_dropout")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    from mnist_jax import preprocessing
    from mnist_jax.config import VARIANTS
    from mnist_jax.data import load_mnist

    mnist = load_mnist(args.data_dir)
    x_all = torch.from_numpy(preprocessing.scale(preprocessing.flatten(mnist.train_images)))
    y_all = torch.from_numpy(mnist.train_labels.astype("int64"))
    cut = preprocessing.split_index(len(x_all), 0.3)
    data = (x_all[:cut], y_all[:cut], x_all[cut:], y_all[cut:],
            torch.from_numpy(preprocessing.scale(preprocessing.flatten(mnist.test_images))),
            torch.from_numpy(mnist.test_labels.astype("int64")))
    data = tuple(t.to(device) for t in data)  # once, for every variant
    for name in args.variants.split(","):
        variant = VARIANTS[name].at_depth((256, 256))
        print(json.dumps(run_variant(variant, data, args.epochs, args.compile, device)),
              flush=True)


if __name__ == "__main__":
    main()
