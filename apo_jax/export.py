"""Export CLI: a training run's checkpoint as Hugging Face weights or a PEFT adapter directory.

    python -m apo_jax.export --workdir=RUN --out=DIR [--format=merged|peft] [--step=S]

merged: config.json + safetensors that `transformers` loads alone (under LoRA the adapters are
folded into the base, W + (alpha / r) · A B). peft (LoRA runs only): adapter_config.json +
adapter_model.safetensors for `peft.PeftModel.from_pretrained(<model.hf_dir>, DIR)`; such a
directory is also a starting point for another run (`model.lora.peft_dir`). The run's saved
config.json says which model, base and adapters the checkpoint holds.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FORMATS = ("merged", "peft")


def export(workdir: str, out: str, fmt: str = "merged", step: int | None = None) -> int:
    """Writes the checkpoint of `workdir` (the latest step unless `step`) to `out` in `fmt`;
    returns the step exported."""
    from flax import nnx

    from apo_jax.models import hf_io, peft_io
    from apo_jax.trainer import build
    from apo_jax.trainer import evaluate as evaluate_lib

    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}: valid: {', '.join(FORMATS)}")
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--workdir={workdir}: no config.json (is it a training workdir?)")
    p = build.plan(build.load_config_json(path))
    lora = p.model.lora
    if fmt == "peft" and lora is None:
        raise ValueError(f"--format=peft: {workdir} is a full fine-tune (model.lora.rank = 0)")
    cfg = build.model_config(p, build.task(p).vocab_size)
    graphdef, params, step = evaluate_lib.restore_params(p, cfg, workdir, step)
    if fmt == "peft":
        peft_io.save_adapters(params, lora, out, base=p.model.hf_dir)
    elif lora is not None:
        peft_io.save_merged(params, lora, cfg, out)
    else:
        hf_io.save_model(nnx.merge(graphdef, params), out)
    return step


def cli():
    # Flags are defined here, not at import: the module's `export` is also a library function
    # (tests import it beside the evaluation CLI, which defines --workdir too).
    workdir = flags.DEFINE_string("workdir", None, "The training run to export (its checkpoint).")
    out = flags.DEFINE_string("out", None, "Output directory.")
    fmt = flags.DEFINE_enum("format", "merged", FORMATS, "merged HF weights or a PEFT adapter.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["workdir", "out"])

    def main(argv) -> None:
        del argv
        done = export(workdir.value, out.value, fmt.value, step.value)
        print(f"exported step {done} of {workdir.value} ({fmt.value}) to {out.value}")

    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    cli()
