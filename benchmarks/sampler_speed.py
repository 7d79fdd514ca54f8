"""Sampler throughput: one compiled program vs a host loop, on-device ODE vs scipy RK45.

    JAX_PLATFORMS=cpu python benchmarks/sampler_speed.py [--steps 100] [--loop_steps 30]

Uses the exact score of Gaussian data N(0.2, 0.5^2 I) in model space, so the figures measure the
samplers, not a network. Prints, for the VP SDE at shape (64, 32, 32, 3):
1. the PC sampler (reverse diffusion + Langevin) compiled into one XLA program vs a Python loop
   calling the same jitted predictor/corrector updates once per step (steps/s, samples/s);
2. the probability-flow ODE solved on device by diffrax (Dopri5) vs host-side scipy RK45 at the
   same tolerances (seconds, NFE, samples/s).
Compilation is excluded from every timing (each path is warmed up once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampling  # noqa: E402
import sde_lib  # noqa: E402

DATA_MEAN, DATA_STD = 0.2, 0.5


def gaussian_score_fn(sde: sde_lib.SDE):
    """Exact score of p_t = N(m_t mu, m_t^2 s^2 + std_t^2) for data N(mu, s^2 I)."""

    def score(x, t):
        m, std = sde.marginal_prob(jnp.ones((t.shape[0],)), t)
        var = m**2 * DATA_STD**2 + std**2
        return -(x - sde_lib.batch_mul(m, jnp.full_like(x, DATA_MEAN))) / var.reshape(
            (-1,) + (1,) * (x.ndim - 1))

    return score


def timed(fn, repeats: int = 1):
    out = fn()  # warm-up: compiles
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="N of the compiled PC sampler")
    parser.add_argument("--loop_steps", type=int, default=30, help="steps of the Python loop")
    parser.add_argument("--ode_batch", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args()
    shape = (args.batch, 32, 32, 3)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} shape={shape}")

    # 1. PC sampler: compiled program vs host loop over jitted updates.
    sde = sde_lib.VPSDE(N=args.steps)
    score_fn = gaussian_score_fn(sde)
    identity = lambda x: x
    sampler = sampling.get_pc_sampler(sde, shape, "reverse_diffusion", "langevin", identity,
                                      snr=0.16, n_steps=1)
    compiled_s, _ = timed(lambda: sampler(jax.random.key(0), score_fn)[0], repeats=3)
    compiled_steps = args.steps / compiled_s

    predictor = sampling.ReverseDiffusionPredictor(sde, score_fn)
    corrector = sampling.LangevinCorrector(sde, score_fn, 0.16, 1)
    predictor_update, corrector_update = jax.jit(predictor.update_fn), jax.jit(corrector.update_fn)
    timesteps = jnp.linspace(sde.T, 1e-3, sde.N)

    def python_loop():
        rng = jax.random.key(0)
        x = sde.prior_sampling(rng, shape)
        for i in range(args.loop_steps):
            t = jnp.full((shape[0],), timesteps[i])
            c_rng, p_rng = jax.random.split(jax.random.fold_in(rng, i))
            x, _ = corrector_update(c_rng, x, t)
            x, x_mean = predictor_update(p_rng, x, t)
        return x_mean

    loop_s, _ = timed(python_loop, repeats=3)
    loop_steps = args.loop_steps / loop_s
    print("PC sampler (reverse_diffusion + langevin, 2 score evals/step):")
    print(f"  compiled program: {compiled_steps:9.1f} steps/s "
          f"{compiled_steps * shape[0]:11.1f} sample-steps/s "
          f"({args.steps} steps in {compiled_s:.2f} s; a 1000-step run: "
          f"{shape[0] * compiled_steps / 1000:.2f} samples/s)")
    print(f"  python loop:      {loop_steps:9.1f} steps/s "
          f"{loop_steps * shape[0]:11.1f} sample-steps/s "
          f"({args.loop_steps} steps in {loop_s:.2f} s; a 1000-step run: "
          f"{shape[0] * loop_steps / 1000:.2f} samples/s)")
    print(f"  speed-up of the compiled program: {compiled_steps / loop_steps:.2f}x")

    # 2. Probability-flow ODE: diffrax on device vs scipy RK45 on the host.
    ode_shape = (args.ode_batch, 32, 32, 3)
    ode_sde = sde_lib.VPSDE()
    ode_score = gaussian_score_fn(ode_sde)
    z = ode_sde.prior_sampling(jax.random.key(1), ode_shape)
    results = {}
    for method in ("dopri5", "scipy_rk45"):
        ode = sampling.get_ode_sampler(ode_sde, ode_shape, identity, rtol=args.tol,
                                       atol=args.tol, method=method)
        seconds, (x, nfe) = timed(lambda ode=ode: ode(None, ode_score, z))
        results[method] = (seconds, int(nfe), x)
        print(f"ODE {method:10s}: {seconds:7.2f} s, nfe {int(nfe):4d}, "
              f"{ode_shape[0] / seconds:8.2f} samples/s, {int(nfe) / seconds:8.1f} evals/s "
              f"(rtol = atol = {args.tol:g})")
    gap = float(jnp.max(jnp.abs(results["dopri5"][2] - results["scipy_rk45"][2])))
    print(f"  speed-up of diffrax over scipy: "
          f"{results['scipy_rk45'][0] / results['dopri5'][0]:.2f}x; "
          f"max |x_diffrax - x_scipy| = {gap:.2e}")


if __name__ == "__main__":
    main()
