"""Trains the independent Fashion-MNIST judge (evaluation/judge.py) once, on clean images.

  python benchmarks/train_judge.py [--data_dir=/usr/share/datasets/fashion-mnist] [--epochs=5]

Reads the IDX files (Debian's dataset-fashion-mnist), trains the small CNN with Adam on the
training split with random horizontal flips, prints its test accuracy and writes
assets/judge/fashion_mnist_judge.npz (float16 weights; the accuracy is stored with them). The
judge never sees diffusion noise or samples: it only knows clean clothes.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import data_files  # noqa: E402
from evaluation import judge  # noqa: E402


def load_split(data_dir, prefix):
    images = data_files.read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = data_files.read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    return images[..., None], labels.astype(np.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--out", default=judge.JUDGE_PATH)
    args = parser.parse_args()
    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "t10k")

    rng = jax.random.PRNGKey(0)
    params = judge.FashionJudge().init(rng, jnp.zeros((1, 28, 28, 1)))["params"]
    steps_per_epoch = len(x_train) // args.batch_size
    schedule = optax.cosine_decay_schedule(2e-3, args.epochs * steps_per_epoch)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, flip, y):
        x = images.astype(jnp.float32) / 255.0
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)

        def loss_fn(p):
            logits = judge.FashionJudge().apply({"params": p}, x)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    shuffle = np.random.RandomState(0)
    t0 = time.time()
    for epoch in range(args.epochs):
        order = shuffle.permutation(len(x_train))
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            flip = shuffle.rand(len(idx)) < 0.5
            params, opt_state, loss = step(params, opt_state, x_train[idx], flip, y_train[idx])
        accuracy = float(np.mean(judge.classify(params, x_test) == y_test))
        print(f"epoch {epoch + 1}/{args.epochs}: loss {float(loss):.4f}, test accuracy "
              f"{accuracy:.4f}, {time.time() - t0:.0f} s", flush=True)
    # Store float16 weights, and measure the accuracy of what is stored.
    judge.save(params, args.out, test_accuracy=0.0)
    stored = judge.load(args.out)
    accuracy = float(np.mean(judge.classify(stored, x_test) == y_test))
    judge.save(params, args.out, test_accuracy=accuracy)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB); test accuracy of the "
          f"stored float16 weights: {accuracy:.4f}")


if __name__ == "__main__":
    main()
