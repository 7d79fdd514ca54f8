"""--mode=interpolate: spherical interpolation between the latents of pairs of images (Song et
al. 2021, Sec. 4.3 and Fig. 3 "interpolation"; the reference notebook's "Representations").

Images 2p and 2p + 1 of config.controllable.source (a split, folder or .npz) are encoded with
the probability-flow ODE (`run_lib.encoding`), their latents joined by slerp at
controllable.interpolation_steps evenly spaced points (both ends included), scaled by
controllable.temperature, and decoded (`run_lib.decoding`). Writes, in <out> (=
<workdir>/interpolate/ckpt_<k> unless config.sample.out): interpolations.npz ('samples' uint8
[P * S, H, W, C], row p of S images for pair p; 'x' the inputs; 'alphas' [S]), pair_<p>.png (a
row per pair: input a, the S decoded images, input b) and interpolations.png (all rows).
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from run_lib import decoding, encoding, files, inputs
from run_lib.batches import Run
from run_lib.checks import UsageError, prepare


def slerp(z0: np.ndarray, z1: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Spherical interpolation of each example: z0, z1 [B, ...], alphas [S] -> [B, S, ...].

    sin((1 - a) w) / sin(w) z0 + sin(a w) / sin(w) z1 with w the angle between z0 and z1
    (Shoemake 1985); linear where the two are (anti)parallel to within float precision.
    """
    a0 = np.asarray(z0, np.float64).reshape(len(z0), -1)
    a1 = np.asarray(z1, np.float64).reshape(len(z1), -1)
    cos = np.sum(a0 * a1, 1) / (np.linalg.norm(a0, axis=1) * np.linalg.norm(a1, axis=1))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))[:, None]  # [B, 1]
    t = np.asarray(alphas, np.float64)[None, :]  # [1, S]
    sin = np.sin(omega)
    parallel = sin < 1e-7
    safe = np.where(parallel, 1.0, sin)
    w0 = np.where(parallel, 1.0 - t, np.sin((1.0 - t) * omega) / safe)
    w1 = np.where(parallel, t, np.sin(t * omega) / safe)
    out = w0[..., None] * a0[:, None] + w1[..., None] * a1[:, None]
    return out.reshape(len(z0), t.shape[1], *np.shape(z0)[1:]).astype(np.float32)


def interpolate(config, workdir: str, eval_folder: str = "eval") -> str:
    """Interpolates between pairs of config.controllable's inputs; returns <out>."""
    del eval_folder
    config = prepare(config, "interpolate", workdir)
    c = config.controllable
    steps = int(c.interpolation_steps)
    if steps < 2:
        raise UsageError(f"config.controllable.interpolation_steps={steps} must be >= 2 (both "
                         "ends included)")
    images, names = inputs.read_images(config)
    pairs = len(images) // 2
    if pairs < 1:
        raise UsageError(f"--mode=interpolate needs at least 2 images; "
                         f"config.controllable.source={c.source!r} gave {len(images)}")
    images = images[:2 * pairs]
    run = Run(config, workdir, "interpolate")
    settings = run.settings(source=c.source, num_inputs=len(images), eps=encoding.EPS)
    _, z = encoding.encode_images(run, images, settings)
    alphas = np.linspace(0.0, 1.0, steps)
    path = slerp(z[0::2], z[1::2], alphas).reshape(pairs * steps, *z.shape[1:])
    # The decoded batches live in their own folder: their settings differ from the encoder's.
    decoded_run = _subfolder(run, "decoded")
    samples = decoding.decode_latents(decoded_run, path, decoded_run.settings(
        source=c.source, num_inputs=len(images), steps=steps, eps=encoding.EPS,
        temperature=float(c.temperature)))
    if files.is_chief():
        files.atomic_savez(os.path.join(run.folder, "interpolations.npz"), samples=samples,
                           x=images, alphas=alphas, names=np.asarray(names[:2 * pairs]))
        rows = []
        for p in range(pairs):
            row = np.concatenate([images[2 * p:2 * p + 1], samples[p * steps:(p + 1) * steps],
                                  images[2 * p + 1:2 * p + 2]])
            files.save_image_grid(row, os.path.join(run.folder, f"pair_{p}.png"), cols=steps + 2)
            rows.append(row)
        files.save_image_grid(np.concatenate(rows), os.path.join(run.folder,
                                                                 "interpolations.png"),
                              cols=steps + 2)
    logging.info("Interpolated %d pairs x %d steps (temperature %g) into %s.", pairs, steps,
                 float(c.temperature), os.path.join(run.folder, "interpolations.npz"))
    return run.folder


def _subfolder(run, name: str):
    """The same run writing its batches under <out>/<name>."""
    sub = object.__new__(type(run))
    sub.__dict__.update(run.__dict__)
    sub.folder = os.path.join(run.folder, name)
    return sub
