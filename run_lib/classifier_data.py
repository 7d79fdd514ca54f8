"""The classifier's data (`run_lib.classifier`): the labelled splits held in memory, and the
training batch of every step as a function of (seed, step), so that a resumed run continues as
an uninterrupted one would."""

from __future__ import annotations

import jax
import numpy as np

import datasets
from run_lib.checks import ConfigError, UsageError


def split_in_memory(config, dataset, what: str):
    """uint8 images [N, H, W, C] and int32 labels [N] of one evaluation-mode split (this host's
    shard)."""
    images, labels = [], []
    for batch in dataset:
        # The pipeline's floats are exactly k / 255.
        images.append(np.round(batch["image"].numpy() * 255.0).astype(np.uint8))
        labels.append(batch["label"].numpy().astype(np.int32))
    if not images:
        raise UsageError(f"The {what} split of {config.data.dataset} has fewer images than one "
                         f"batch (config.eval.batch_size={config.eval.batch_size}).")
    images, labels = np.concatenate(images), np.concatenate(labels)
    if np.any(labels == datasets.NO_LABEL):
        raise UsageError(f"config.data.dataset={config.data.dataset} has no class labels; a "
                         "classifier needs a labelled data set (CIFAR10, SVHN, MNIST, "
                         "FashionMNIST, or a 'folder' with one subfolder per class).")
    if labels.max() >= config.classifier.num_classes:
        raise ConfigError(f"config.classifier.num_classes={config.classifier.num_classes} but "
                          f"the {what} split has label {int(labels.max())}.")
    return images, labels


class Batches:
    """The batch of a step: epoch e visits this host's examples in a permutation drawn from
    (seed, e, host), so any step's batch is known without replaying the run."""

    def __init__(self, images, labels, local_batch: int, seed: int):
        if len(images) < local_batch:
            raise ConfigError(f"config.classifier.batch_size is larger than the {len(images)} "
                              "training images this host holds.")
        self.images, self.labels, self.b, self.seed = images, labels, local_batch, seed
        self.per_epoch = len(images) // local_batch
        self._epoch, self._perm = None, None

    def __call__(self, step: int):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, epoch, jax.process_index()))
            self._epoch, self._perm = epoch, rng.permutation(len(self.images))
        idx = self._perm[i * self.b:(i + 1) * self.b]
        return self.images[idx], self.labels[idx]


def load_splits(config):
    """((images, labels) of the training split, the same of the test split), checked against
    config.classifier (one unshuffled pass of each, held in memory)."""
    c = config.classifier
    train_ds, test_ds, source = datasets.get_dataset(config, evaluation=True)
    names = datasets.class_names(source)
    if names and len(names) != c.num_classes:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ConfigError(f"config.classifier.num_classes={c.num_classes} but "
                          f"{config.data.dataset} has {len(names)} classes ({shown}); set "
                          f"--config.classifier.num_classes={len(names)} (here and for "
                          "--mode=conditional).")
    train = split_in_memory(config, train_ds, "train")
    test = split_in_memory(config, test_ds, "test")
    if len(test[0]) < c.batch_size // jax.process_count():
        raise ConfigError(f"config.classifier.batch_size={c.batch_size} is larger than the "
                          f"{len(test[0])} test images this host holds (evaluation batches).")
    return train, test
