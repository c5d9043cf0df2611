"""APO with LoRA on Qwen3-8B, MATH Level 3, the paper's shapes (48 prompts x G 6, lengths
1024 / 1280, 2 mini-batches): LoRA rank 16, alpha 32 on every linear projection (q, k, v, o,
gate, up, down), the base frozen in bfloat16 and read in place by the sampler, the KL reference
(if any) the base itself. Sized for 8 devices of 16 GB (TPU v5e-8): see README.md "LoRA" and
benchmarks/README.md for the dry-run numbers.

    python -m apo_jax.main --config=experiments/apo_lora_qwen3_8b_math_l3.py \\
        --workdir=runs/apo_lora_8b --config.model.hf_dir=/path/to/Qwen3-8B
    python -m apo_jax.export --workdir=runs/apo_lora_8b --out=runs/apo_lora_8b/peft --format=peft
"""

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.optim.packing = "packed"  # padding-free update passes (benchmarks/README.md, issue 21)
    c.model.preset = "qwen3_8b"  # the shapes for --dry_run without weights; hf_dir overrides
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.base_dtype = "bfloat16"
    # LoRA trains ~0.5% of the weights through a rank-16 bottleneck: the usual learning rate is
    # about ten times a full fine-tune's (1e-6 in the paper's setup).
    c.optim.lr = 1e-5
    c.mesh.data, c.mesh.fsdp = 1, 8  # 8 chips: the frozen base and adapters split 8 ways
    # Memory (benchmarks/README.md, "LoRA"): 6 micro-batches of 24 rows (3 per device) and the
    # rollout in chunks of 8 prompts x G 6, as apo_math_l3.py; the results do not change.
    c.optim.micro_batches = 6
    c.rollout.rows_per_chunk = 48
    c.eval.num_prompts = 256
    c.eval.every_steps = 22
    if arg and "debug" in arg.split(","):
        base.apply_debug(c)
        c.mesh.fsdp = 1
    return c
