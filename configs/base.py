"""Every default of apo_jax, in one place. Other config files override a few keys each.

Defaults follow the APO paper's setup (../shared/docs/APO_SPEC.md §3, §6): Qwen3-1.7B on MATH
Level 3, G = 6, 48 prompts per step in 2 mini-batches, lengths 1024 / 1280, temperature 1,
AdamW lr 1e-6, no KL, APO with the reward- and confidence-guarded alpha schedule.

APO_JAX_DATA_DIR defaults to ../shared/data beside the checkout (see apo_jax/tasks/datasets.py).
Usage: --config=configs/base.py[:debug]  (the `debug` arg shrinks everything for a CPU smoke run)
"""

import ml_collections

from apo_jax import objectives, tasks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, rollout sampling
    c.total_steps = 66  # rollout steps (each: sample a batch, then optim.mini_batches updates)

    c.model = m = ml_collections.ConfigDict()
    m.preset = "qwen3_1p7b"  # preset of any family (models/registry.py), random init
    m.vocab_size = 0  # random init only: 0 = the preset's, -1 = the task's vocabulary size
    m.hf_dir = ""  # HF model dir (family read from config.json); overrides preset
    m.param_dtype = "float32"  # learner parameter dtype: float32 | bfloat16
    m.dtype = "bfloat16"  # matmul compute dtype (accumulation is always float32)
    # none | block | a policy of models/decoder.py REMAT_POLICIES (dots_saveable, ...): block
    # keeps only each block's input for the backward pass (True / False = block / none).
    m.remat = "block"
    # auto | xla_blockwise | cudnn | splash | naive (models/attention.py). auto: cuDNN flash on
    # GPU, splash on TPU, blockwise online-softmax XLA elsewhere; naive: dense [T, S] scores.
    m.attention = "auto"
    # Layers as one [L, ...] stack under lax.scan (compile time independent of depth; remat
    # effective); the rollout loops over layer slices. False: per-layer weights, a Python loop.
    m.scan_layers = True
    m.logprob_precision = "default"  # scoring (anchor, reference, train step): default | float32

    # Tasks are plug-ins (apo_jax/tasks/): each registered task brings its block of keys,
    # config.task.<name>.*, with defaults and meanings in its module (e.g. tasks/math.py).
    c.task = tasks.default_config("math")  # task.name: math | toy | toy_sorted

    c.rollout = r = ml_collections.ConfigDict()
    r.prompts_per_step = 48  # P: prompts sampled per rollout step
    r.group_size = 6  # G: completions per prompt
    r.max_prompt_len = 1024  # tokens; longer prompts are left-truncated
    r.max_new_tokens = 1280  # tokens per completion
    r.temperature = 1.0  # sampling temperature (0 = greedy)
    r.top_k = 0  # 0 = off
    r.top_p = 1.0  # nucleus mass, 1 = off
    r.dynamic_sampling = False  # DAPO: drop groups with all-equal rewards and refill
    r.max_refill_rounds = 10  # dynamic sampling: at most this many extra generation rounds
    # KV cache dtype: auto (bfloat16 on GPU/TPU, the compute dtype on CPU) | float32 | bfloat16
    r.cache_dtype = "auto"
    r.overlong_buffer = 0  # DAPO overlong shaping buffer L_cache in tokens (0 = off)
    # Rows (prompts x G) per sampler call, per process: the KV cache holds this many rows at a
    # time (0 = all of a step's rows in one call). A multiple of G dividing each process's rows.
    r.rows_per_chunk = 0

    # Losses are plug-ins (apo_jax/objectives/): each registered objective brings its block,
    # config.loss.<name>.*, with the family's canonical defaults (GSPO 3e-4 / 4e-4, DAPO 0.2 /
    # 0.28, ...) and their meanings in its module (e.g. objectives/gspo.py).
    # loss.name: apo | fdiv | grpo | dapo | dr_grpo | gspo
    c.loss = objectives.default_config("apo")
    # Sampler/trainer mismatch correction, any objective (apo_jax/trainer/rollout_correction.py).
    c.loss.rollout_correction = "none"  # none | tis_token | tis_sequence | mis_sequence
    c.loss.rollout_correction_cap = 2.0  # C > 1: TIS weight cap; MIS keeps ratios in [1/C, C]

    c.schedule = s = ml_collections.ConfigDict()
    # The alpha/tau schedule, used by objectives that declare schedule=True (apo, fdiv).
    s.mode = "legacy"  # alpha schedule: legacy (spec §2) | ess (Appendix A) | fixed
    s.scope = "group"  # schedule statistics per prompt group or over the batch
    s.alpha = 0.9  # alpha when mode = fixed; must lie in (0, 1]
    s.alpha_max = 0.9  # coverage end (forward-KL-like)
    s.alpha_min = 0.35  # mode-seeking end
    s.adaptive_tau = True  # tau rule of spec §2 (else tau = tau0)
    s.tau0 = 0.5  # base anchoring temperature
    s.a_tau = 0.2  # tau weight on the anchor's normalised NLL H_stat (spec §2)
    s.b_tau = 0.5  # tau weight on -confidence * signal
    s.tau_min = 0.2  # lower clip of tau
    s.tau_max = 1.5  # upper clip of tau
    s.use_ema = False  # legacy mode: smooth alpha with an EMA
    s.ema_momentum = 0.9  # legacy mode EMA: alpha <- m * alpha_ema + (1 - m) * alpha_t
    s.ess_target_frac = 0.5  # ess mode: target ESS = frac * G (Appendix A)
    s.ess_candidates = 11  # ess mode: alpha grid size over [alpha_min, alpha_max]
    s.ess_warmup_calls = 10  # ess mode: alpha = alpha_max for this many first updates
    s.ess_momentum = 0.9  # ess mode: alpha <- clip(m * alpha_prev + (1 - m) * alpha*, ...)
    s.ess_max_step = 0.05  # ess mode: largest change of alpha per update

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-6  # peak learning rate
    o.warmup_steps = 0  # linear warm-up, in optimizer updates
    o.decay = "constant"  # constant | cosine (to 0 at the last update)
    o.b1 = 0.9  # AdamW beta1
    o.b2 = 0.999  # AdamW beta2
    o.weight_decay = 0.01  # AdamW decoupled weight decay
    o.grad_clip = 1.0  # global-norm gradient clip (0 = off)
    o.mini_batches = 2  # optimizer updates per rollout step (prompts split evenly)
    o.micro_batches = 1  # gradient accumulation inside each update (exact, any rows; divides them)
    o.logprob_chunk = 8192  # vocabulary chunk of the fused log-prob kernel

    c.mesh = me = ml_collections.ConfigDict()
    me.data = -1  # data-parallel axis size (-1 = the devices left over)
    me.fsdp = 1  # fully-sharded data-parallel axis size
    me.tensor = 1  # tensor-parallel axis size

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 10  # save every N rollout steps (and at the end / on SIGTERM)
    ck.keep = 3  # keep the last N checkpoints

    c.eval = e = ml_collections.ConfigDict()
    e.every_steps = 0  # held-out evaluation every N steps (0 = only at the end if num_prompts)
    e.num_prompts = 0  # held-out prompts per evaluation (0 = no evaluation)
    e.rows_per_chunk = 0  # rows per evaluation sampler call, per process (0 = the rollout's)

    c.logging = lg = ml_collections.ConfigDict()
    lg.tensorboard = True  # write TensorBoard events under workdir/tensorboard
    lg.plots = True  # write PNG plots under workdir/plots at the end
    lg.progress = True  # tqdm progress bar
    # Weights & Biases (README "Tracking"; needs the extra: pip install -e ".[wandb]").
    lg.wandb = False  # one W&B run per workdir; a resumed run continues it
    lg.wandb_project = "apo_jax"
    lg.wandb_entity = ""  # team or user ("" = the API key's default entity)
    lg.wandb_mode = "online"  # online | offline (written under workdir/wandb, `wandb sync` later)
    lg.wandb_group = ""  # run group ("" = none; apo_jax.sweep sets the sweep's name)
    lg.wandb_tags = ()  # run tags, each 1-64 characters (apo_jax.sweep adds arm and seed)

    if arg and "debug" in arg.split(","):
        apply_debug(c)
    return c


def apply_debug(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config to a random tiny model and a few short steps (CPU, seconds)."""
    c.model.preset, c.model.hf_dir = "tiny", ""
    c.model.vocab_size = -1  # the task's vocabulary (the real Qwen3 one for math tasks)
    c.model.dtype, c.model.param_dtype, c.model.remat = "float32", "float32", "none"
    c.total_steps = 2
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 2
    c.rollout.max_prompt_len = 64
    c.rollout.max_new_tokens = 8
    c.rollout.rows_per_chunk = 0  # the memory settings of a large run do not fit these shapes
    c.optim.lr = 1e-3
    c.optim.micro_batches = 1
    c.checkpoint.every_steps = 0
    c.logging.tensorboard = False
    c.logging.plots = False
    c.logging.progress = False
    if c.eval.num_prompts:
        c.eval.num_prompts = 4
