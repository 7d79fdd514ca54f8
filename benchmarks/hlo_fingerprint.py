"""A fingerprint of the train step's compiled program, to show that a change which only moves
code leaves the program XLA runs unchanged.

    python benchmarks/hlo_fingerprint.py [--only NAME ...]

For each case (a config with small overrides) it builds the train step the way a run does
(`run_lib.steps.build_step_fns` on the device mesh, so whatever the build layer switches on
for this backend is included), lowers it on abstract inputs, compiles it and prints one line:
hashes of the lowered module (without debug information) and of the optimized HLO (debug
information stripped; and again with every instruction, parameter and computation name
renumbered in order of appearance: XLA names instructions after the Python scopes they were
traced in, so a renamed module or method renames them), the seconds to lower (trace) and to
compile, and the counts of the operations that the backend's formulations add or remove
(convolutions, fusions, conditionals, custom calls, while loops).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# name: (config file, overrides of config.training / config.model)
CASES = {
    "tiny_dropout": ("configs/tiny_test.py", {"model.dropout": 0.1}),
    "quickstart_dropout": ("configs/vp/fashion_mnist_ddpmpp_quickstart.py",
                           {"model.dropout": 0.1, "training.batch_size": 2,
                            "training.n_jitted_steps": 2}),
    "cifar10_ncsnpp_5": ("configs/ve/cifar10_ncsnpp_continuous.py",
                         {"training.batch_size": 2, "training.n_jitted_steps": 5}),
    "quickstart_dropout_remat": ("configs/vp/fashion_mnist_ddpmpp_quickstart.py",
                                 {"model.dropout": 0.1, "training.batch_size": 2,
                                  "training.n_jitted_steps": 2, "training.remat": True}),
    "cifar10_ncsnpp": ("configs/ve/cifar10_ncsnpp_continuous.py",
                       {"training.batch_size": 2, "training.n_jitted_steps": 1}),
    "cifar10_ncsnpp_remat": ("configs/ve/cifar10_ncsnpp_continuous.py",
                             {"training.batch_size": 2, "training.n_jitted_steps": 1,
                              "training.remat": True}),
}

_OPS = ("convolution", "fusion", "conditional", "custom-call", "while", "copy", "transpose",
        "opt-barrier")


def _load_config(path, overrides):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_fingerprint_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def _strip(text: str) -> str:
    """The HLO without debug information: each instruction's metadata (source lines, op names)
    and the module's tables of file names, function names, locations and stack frames."""
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    text = re.sub(r",?\s*stack_frame_id=\d+", "", text)
    text = re.sub(r"^HloModule [^\n]*", "HloModule", text)
    text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(?:(?!%|ENTRY).*\n)*",
                  "", text, flags=re.MULTILINE)
    return text


def _renumbered(text: str) -> str:
    """Every instruction, parameter and computation name renumbered in order of appearance,
    and each computation's parameter instructions listed by number (their printed order
    follows the names XLA gave them, e.g. when the step is traced as a nested jit)."""
    names: dict[str, str] = {}

    def rename(match):
        return names.setdefault(match.group(0).lstrip("%"), f"%n{len(names)}")

    lines, block = [], []
    for line in text.split("\n") + [""]:
        if re.search(r" parameter\(\d+\)", line) and "ROOT" not in line:
            block.append(line)
            continue
        lines += sorted(block, key=lambda p: int(re.search(r"parameter\((\d+)\)", p)[1]))
        block = []
        lines.append(line)
    # Names: %name anywhere, and a computation's parameter names in its signature (no %).
    return re.sub(r"%[\w.\-]+|\b[\w\-]+\.\d+(?=: )", rename, "\n".join(lines[:-1]))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(name: str, compile_: bool = True, dump: str = "") -> dict:
    import losses
    from run_lib import devices, steps

    path, overrides = CASES[name]
    config = _load_config(path, overrides)
    tc = config.training
    sde, model = steps.build(config)
    optimizer = losses.get_optimizer(config)
    mesh = devices.make_mesh()
    train_step, _ = steps.build_step_fns(config, sde, model, optimizer, mesh)
    state = jax.eval_shape(lambda key: losses.init_train_state(key, config)[1],
                           jax.random.PRNGKey(0))
    shape = (tc.n_jitted_steps, tc.batch_size, config.data.image_size,
             config.data.image_size, config.data.num_channels)
    batch = jax.ShapeDtypeStruct(shape, jax.numpy.float32)
    start = time.time()
    lowered = train_step.lower(state, batch)
    lower_s = time.time() - start
    lowered_text = lowered.as_text(debug_info=False)
    hlo = _strip(lowered.compile().as_text()) if compile_ else ""
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, name + ".hlo.txt"), "w") as f:
            f.write(hlo)
    counts = collections.Counter(re.findall(r"= \S+ (\S+?)\(", hlo))
    return {"case": name, "backend": jax.default_backend(),
            "lowered_sha": _sha(lowered_text), "hlo_sha": _sha(hlo),
            "hlo_renumbered_sha": _sha(_renumbered(hlo)),
            "instructions": sum(counts.values()),
            **{op: counts.get(op, 0) for op in _OPS},
            "lowered_cond": lowered_text.count("stablehlo.case")
            + lowered_text.count("stablehlo.if"),
            "lowered_barrier": lowered_text.count("optimization_barrier"),
            "lower_s": round(lower_s, 1), "compile_s": round(time.time() - start - lower_s, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), default=None)
    parser.add_argument("--lowered_only", action="store_true",
                        help="skip compiling: the lowered module's hash and counts only")
    parser.add_argument("--dump", default="", help="folder to write each stripped HLO to")
    args = parser.parse_args()
    for name in args.only or CASES:
        print(json.dumps(fingerprint(name, not args.lowered_only, args.dump)), flush=True)


if __name__ == "__main__":
    main()
