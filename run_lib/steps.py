"""The jitted, sharded programs a run executes: `program` (the one jit of a function of
(rng, params, model_state, batch...) on the mesh), `LoopProgram` (a sampling loop in parts) and
`stream` (named keys). The programs a config builds (train step, eval loss, sampler, bits/dim)
are made in `run_lib.build`; their names stay importable from here."""

from __future__ import annotations

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import backend
from run_lib import logs
from run_lib.devices import batch_sharded, replicated
from run_lib.interrupt import Interrupted, interrupted

# A sampling loop (sampling.LoopParts) runs as at most this many calls of one compiled program:
# between them a long batch logs its progress (at most every PROGRESS_SECONDS) and Ctrl-C is
# honoured, at the cost of one dispatch and one wait per call (micro- to milliseconds against
# seconds or minutes of sampling).
LOOP_CALLS = 20
PROGRESS_SECONDS = 10.0


def program(fn, mesh, what: str, *, batch_args: int | None = 0, out="batch",
            donate_argnums=(), host: bool = False):
    """`fn` as the program a run executes on `mesh`: the one place programs are jitted.

    fn(rng, params, model_state, *batch) with `batch_args` batch arrays: the key, parameters and
    model state replicated, the batch arrays split over the mesh (batch_args=None: every
    argument keeps the sharding it comes with, e.g. a sampling loop's carry). `out`: the
    output's shardings, a pytree of "batch", "replicated" or shardings. Traced with the
    backend's formulations and compiled with its options (`backend.jit`); announced by a log
    line when it compiles (`logs.CompiledOnFirstCall`). host=True (a scipy ODE method, see
    `ode.is_host_method`): `fn` runs unjitted; scipy drives the solve from the host.
    """
    if host:
        return backend.tuned(fn)
    named = {"batch": batch_sharded(mesh), "replicated": replicated(mesh)}
    out = jax.tree_util.tree_map(lambda s: named[s] if isinstance(s, str) else s, out)
    kwargs = {} if batch_args is None else {
        "in_shardings": (named["replicated"],) * 3 + (named["batch"],) * batch_args}
    return logs.CompiledOnFirstCall(
        backend.jit(fn, out_shardings=out, donate_argnums=donate_argnums, **kwargs), what)


class LoopProgram:
    """Runs a sampler given as `sampling.LoopParts` in at most LOOP_CALLS calls of one compiled
    program (per batch size), logging progress and honouring Ctrl-C between calls.

    program(rng, batch, score_args, inputs=()) -> samples [batch, ...] (batch-sharded): with
    parts = parts_of(batch), init(rng, *inputs), the loop with score_fn = score_of(*score_args)
    (traced: parameters are arguments, not constants), then finish.
    """

    def __init__(self, parts_of, score_of, mesh, what: str, calls: int = LOOP_CALLS):
        self.parts_of, self.score_of, self.mesh, self.what = parts_of, score_of, mesh, what
        self.calls, self._programs = calls, {}

    def _build(self, parts, rng, inputs, batch):
        mesh = self.mesh
        carry = jax.eval_shape(parts.init, rng, *inputs)
        # The sample and what it keeps are split over the batch; the key (uint32 [2] or a typed
        # key) is replicated.
        shardings = jax.tree_util.tree_map(
            lambda x: batch_sharded(mesh) if x.ndim >= 1 and x.shape[0] == batch
            and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key) and x.dtype != jnp.uint32
            else replicated(mesh), carry)
        init = jax.jit(parts.init, out_shardings=shardings)

        def advance(carry, start, stop, *score_args):
            return parts.advance(carry, self.score_of(*score_args), start, stop)

        advance = program(advance, mesh, f"{self.what} ({parts.num_steps} steps, batch {batch})",
                          batch_args=None, out=shardings, donate_argnums=0)
        finish = jax.jit(parts.finish, out_shardings=batch_sharded(mesh))
        return init, advance, finish

    def __call__(self, rng, batch: int, score_args, inputs=()):
        key = (batch, *((np.shape(x), str(getattr(x, "dtype", ""))) for x in (rng, *inputs)))
        if key not in self._programs:
            parts = self.parts_of(batch)
            self._programs[key] = (parts, *self._build(parts, rng, inputs, batch))
        parts, init, advance, finish = self._programs[key]
        n = parts.num_steps
        bounds = np.unique(np.linspace(0, n, min(self.calls, n) + 1).round().astype(np.int32))
        carry = init(rng, *inputs)
        advance.compile(carry, np.int32(0), np.int32(n), *score_args)
        t0 = last = time.time()
        for k, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if k and interrupted():
                raise Interrupted(f"Interrupted at step {start} of {n} of {self.what}")
            carry = advance(carry, np.int32(start), np.int32(stop), *score_args)
            jax.block_until_ready(carry)
            now = time.time()
            if now - last >= PROGRESS_SECONDS and stop < n:
                eta = (now - t0) / stop * (n - stop)
                logging.info("%s: step %d/%d, %.0f s, ETA %s", self.what, stop, n, now - t0,
                             logs.fmt_eta(eta))
                last = now
        return finish(carry)


def stream(key, name: str):
    """An independent key for one purpose of a run (snapshot samples, eval rounds, ...).

    fold_in(key, crc32(name)): named rather than numbered, so that adding a purpose never
    shifts the randomness of another, and readable at the call site.
    """
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


_BUILT = ("build", "build_step_fns", "get_bpd_fn", "get_sample_fn", "get_score_fn")


def __getattr__(name):
    # run_lib.build imports this module; its names are re-exported lazily (PEP 562) so that
    # `from run_lib.steps import build_step_fns` keeps working without an import cycle.
    if name in _BUILT:
        from run_lib import build
        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
