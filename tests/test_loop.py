"""The one training loop (run_lib.loop) on a toy task, in-process: its schedule of logs,
evaluations and checkpoints, a resume that continues bit-exactly, the non-finite guard and
Ctrl-C at a safe point, each naming the last verified checkpoint."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from models.utils import State
from run_lib import checkpoints, interrupt, loop


@jax.jit
def _step(state, batch):
    """One step of w <- w + 0.5 (mean(batch) - w): the loss before it, and a 'metric'."""
    loss = jnp.sum((batch.mean(0) - state.params["w"]) ** 2)
    w = state.params["w"] + 0.5 * (batch.mean(0) - state.params["w"])
    return state.replace(step=state.step + 1, params={"w": w}), {"loss": loss, "w0": w[0]}


def _batch(step):
    # A function of the step, as the classifier's batches: any step's batch is known.
    return jnp.asarray(np.random.default_rng(step).normal(size=(4, 3)), jnp.float32)


def _init():
    return State(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, opt_state={},
                 params_ema={}, model_state={}, rng=jax.random.PRNGKey(0))


class _Toy(loop.Task):
    name = "toy"

    def __init__(self, folder, poison_at=None):
        config = ConfigDict({"training": {"max_ckpts_to_keep": 0}})
        self.manager = checkpoints.managers(folder, config)[0]
        self.evaluated, self.saved, self.poison_at = [], [], poison_at

    def batch(self, step):
        if step == self.poison_at:
            return jnp.full((4, 3), jnp.nan)
        return _batch(step)

    def evaluate(self, state, step):
        self.evaluated.append(step)
        return {"w1": float(state.params["w"][1])}

    def post_save(self, step, state, at_end):
        self.saved.append((step, at_end))


def _schedule(total):
    return loop.Schedule(total, 1, 4, log_freq=2, eval_freq=3, save_freqs=(2,),
                         eval_at_end=True)


def _resume(task):
    return loop.resume(task, jax.eval_shape(_init), _init)


def test_schedule_then_resume_continues_bit_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    whole = _Toy(str(tmp_path / "whole"))
    final = loop.run(whole, _resume(whole), _step, _schedule(7), "the toy step")
    assert sorted(whole.manager.all_steps()) == [2, 4, 6, 7]
    assert whole.evaluated == [3, 6, 7] and whole.saved == [(2, False), (4, False),
                                                            (6, False), (7, True)]
    assert "toy step 4/7  loss " in caplog.text and "  w0 " in caplog.text
    assert "steps/s" in caplog.text and "ETA" in caplog.text

    # w after 7 steps, by hand.
    w = np.zeros(3, np.float32)
    for step in range(7):
        w = w + np.float32(0.5) * (np.asarray(_batch(step)).mean(0) - w)
    np.testing.assert_allclose(final.params["w"], w, rtol=1e-6)

    # A run to 5 steps (saved at 2, 4 and its end), extended to 7: the same bits.
    part = _Toy(str(tmp_path / "part"))
    loop.run(part, _resume(part), _step, _schedule(5), "the toy step")
    again = _Toy(str(tmp_path / "part"))
    state = _resume(again)
    assert int(state.step) == 5 and again.good_step == 5  # the final step is saved too
    assert "Resumed from" in caplog.text and "at step 5" in caplog.text
    resumed = loop.run(again, state, _step, _schedule(7), "the toy step")
    assert int(resumed.step) == 7
    np.testing.assert_array_equal(np.asarray(resumed.params["w"]), np.asarray(final.params["w"]))
    # Nothing left to do: the state comes back unchanged, with one line.
    done = _Toy(str(tmp_path / "part"))
    assert int(loop.run(done, _resume(done), _step, _schedule(7), "the toy step").step) == 7
    assert "Already trained to toy step 7 >= n_iters=7; nothing to do." in caplog.text


def test_non_finite_loss_stops_before_the_save_naming_the_last_good_step(tmp_path):
    task = _Toy(str(tmp_path / "w"), poison_at=3)
    with pytest.raises(FloatingPointError, match=r"Non-finite training loss \[?nan\]? at step 4"
                       r"; stopping before any checkpoint is written; the last good state is "
                       r"step 2 in "):
        loop.run(task, _resume(task), _step, _schedule(7), "the toy step")
    assert sorted(task.manager.all_steps()) == [2]


def test_the_loss_is_logged_first_and_the_task_hint_ends_the_non_finite_error(tmp_path, caplog):
    @jax.jit
    def step(state, batch):  # a dict whose other metric sorts before "loss"
        state, metrics = _step(state, batch)
        return state, {"accuracy": metrics["w0"], "loss": metrics["loss"]}

    task = _Toy(str(tmp_path / "w"), poison_at=3)
    task.loss_hint = " Lower the step size."
    with caplog.at_level(logging.INFO), pytest.raises(
            FloatingPointError, match=r"the last good state is step 2 in .*\. Lower the step "
                                      r"size\.$"):
        loop.run(task, _resume(task), step, _schedule(7), "the toy step")
    assert re.search(r"toy step 2/7  loss [0-9.]+  accuracy [-0-9.]+  ", caplog.text)


def test_ctrl_c_stops_between_steps_naming_the_last_good_step(tmp_path):
    task = _Toy(str(tmp_path / "w"))
    loop.run(task, _resume(task), _step, _schedule(4), "the toy step")
    again = _Toy(str(tmp_path / "w"))
    interrupt._requested.set()
    try:
        with pytest.raises(interrupt.Interrupted,
                           match="Interrupted at toy step 4; the last good state is step 4 in "):
            loop.run(again, _resume(again), _step, _schedule(7), "the toy step")
    finally:
        interrupt._requested.clear()
    assert sorted(again.manager.all_steps()) == [2, 4]


def test_a_checkpoint_written_without_the_empty_fields_resumes(tmp_path, caplog):
    """The classifier's checkpoints from before it shared `State` hold (step, params,
    opt_state, rng) only: they restore into `State` with empty params_ema / model_state."""
    import flax

    @flax.struct.dataclass
    class OldClassifierState:
        step: object
        params: object
        opt_state: object
        rng: object

    task = _Toy(str(tmp_path))
    old = OldClassifierState(step=jnp.asarray(4, jnp.int32),
                             params={"w": jnp.asarray([1.0, 2.0, 3.0])},
                             opt_state={"m": jnp.asarray([0.5])}, rng=jax.random.PRNGKey(7))
    checkpoints.save(task.manager, 4, old, "meta", 4)
    abstract = jax.eval_shape(lambda: _init().replace(opt_state={"m": jnp.zeros(1)}))
    with caplog.at_level(logging.INFO):
        state = loop.resume(task, abstract, _init)
    assert int(state.step) == 4 and state.params_ema == {} and state.model_state == {}
    np.testing.assert_array_equal(state.params["w"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(state.opt_state["m"], [0.5])
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(7))
    assert "at step 4" in caplog.text
