"""The one list of main.py's modes (run_lib.modes): --help reads it without JAX, and every
mode it names is a function (config, workdir, eval_folder)."""

import inspect
import subprocess
import sys

from run_helpers import ROOT

import run_lib
from run_lib import modes


def test_main_reads_the_modes_without_importing_jax_or_tensorflow():
    code = ("import sys; sys.argv = ['main.py']; import main; "
            "from absl import flags; "
            "assert flags.FLAGS['mode'].parser.enum_values == main.modes.NAMES; "
            "heavy = sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_mode_takes_config_workdir_and_eval_folder():
    assert run_lib.MODES == {name: modes.load(name) for name in modes.NAMES}
    assert len(set(modes.NAMES)) == len(modes.NAMES) == 15
    for name, fn in run_lib.MODES.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:3]] == ["config", "workdir", "eval_folder"], name
        assert params[2].default == "eval", name
        assert all(p.default is not inspect.Parameter.empty for p in params[3:]), name
