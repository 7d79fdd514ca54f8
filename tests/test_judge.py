"""The independent Fashion-MNIST judge: its stored weights classify real test images, and its
feature distance separates real images from noise."""

import numpy as np
from run_helpers import FASHION, read_idx

from evaluation import judge


def test_stored_judge_classifies_real_test_images():
    params = judge.load()
    images = read_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz")[:1000]
    labels = read_idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz")[:1000]
    accuracy = float(np.mean(judge.classify(params, images[..., None]) == labels))
    with np.load(judge.JUDGE_PATH) as f:
        stored = float(f["test_accuracy"])
    assert stored > 0.88 and accuracy > 0.85, (stored, accuracy)
    # 32 px zero-padded images are cropped back: the same predictions.
    padded = np.pad(images[:50, :, :, None], ((0, 0), (2, 2), (2, 2), (0, 0)))
    np.testing.assert_array_equal(judge.classify(params, padded),
                                  judge.classify(params, images[:50, :, :, None]))


def test_judge_fid_is_small_between_real_halves_and_large_for_noise():
    params = judge.load()
    images = read_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz")[:2000, :, :, None]
    noise = np.random.RandomState(0).randint(0, 256, (1000, 28, 28, 1)).astype(np.uint8)
    real = judge.judge_fid(params, images[:1000], images[1000:])
    fake = judge.judge_fid(params, noise, images[1000:])
    assert real < 0.05 * fake, (real, fake)
