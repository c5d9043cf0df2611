"""Every default of apo_jax, in one place. Other config files override a few keys each.

Defaults follow the APO paper's setup (../shared/docs/APO_SPEC.md §3, §6): Qwen3-1.7B on MATH
Level 3, G = 6, 48 prompts per step in 2 mini-batches, lengths 1024 / 1280, temperature 1,
AdamW lr 1e-6, no KL, APO with the reward- and confidence-guarded alpha schedule.

APO_JAX_DATA_DIR defaults to ../shared/data beside the checkout (see apo_jax/data.py).
Usage: --config=configs/base.py[:debug]  (the `debug` arg shrinks everything for a CPU smoke run)
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, rollout sampling
    c.total_steps = 66  # rollout steps (each: sample a batch, then optim.mini_batches updates)

    c.model = m = ml_collections.ConfigDict()
    m.preset = "qwen3_1p7b"  # Qwen3Config preset for random init, used when hf_dir is empty
    m.vocab_size = 0  # random init only: 0 = the preset's, -1 = the task's vocabulary size
    m.hf_dir = ""  # Hugging Face Qwen3 directory (config.json + safetensors); overrides preset
    m.param_dtype = "float32"  # learner parameter dtype: float32 | bfloat16
    m.dtype = "bfloat16"  # matmul compute dtype (accumulation is always float32)
    m.remat = True  # recompute each block's activations in the backward pass (saves memory)

    c.task = t = ml_collections.ConfigDict()
    t.name = "math"  # math | toy | toy_sorted  (see apo_jax/tasks.py)
    t.data_path = ""  # MATH-style JSONL/Parquet; empty = $APO_JAX_DATA_DIR/math/math_train.jsonl
    t.eval_path = ""  # held-out JSONL; empty = $APO_JAX_DATA_DIR/math/math_test.jsonl
    t.tokenizer = ""  # tokenizer dir; empty = model.hf_dir if it has one, else .../qwen3
    t.level = 3  # keep MATH problems of this level (0 = all levels)
    t.reward = "good_accuracy"  # good_accuracy (author's shaped reward) | correct (0/1)
    t.enable_thinking = True  # Qwen3 chat template thinking mode

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
    r.overlong_buffer = 0  # DAPO overlong shaping buffer L_cache in tokens (0 = off)

    c.loss = lo = ml_collections.ConfigDict()
    lo.name = "apo"  # apo | grpo | gspo | dapo | dr_grpo | fdiv
    lo.beta_r = 0.3  # apo/fdiv: reward temperature of the target q = softmax((r - mean r)/beta_r)
    lo.clip_log_ratio = 5.0  # apo/fdiv: clamp on the per-sequence mean log-ratio
    lo.clip_score = 10.0  # apo/fdiv: clamp on the anchored score u = log-ratio / tau
    lo.scale_rewards = False  # apo/fdiv: divide group advantages by their std before q
    lo.logit_reg_coef = 0.0  # apo: reference-code logit regulariser (0.01 to reproduce; §1.7a)
    lo.on_policy_fix = False  # apo: reference-code "on-policy fix" (§1.7b), off by default
    lo.divergence = "js"  # fdiv: forward_kl | reverse_kl | js | hellinger | alpha
    lo.clip_eps_low = 0.2  # grpo/dapo/dr_grpo/gspo: lower ratio clip (gspo canonical: 3e-4)
    lo.clip_eps_high = 0.2  # upper ratio clip (dapo: 0.28; gspo canonical: 4e-4)
    lo.dual_clip = 0.0  # grpo/dapo: dual-clip constant c for A < 0 (0 = off; verl uses 3)
    lo.scale_adv = True  # grpo/dapo/gspo: divide advantages by the group std
    lo.agg_mode = "seq-mean-token-mean"  # grpo: token-mean | seq-mean-token-mean | ...-sum-norm
    lo.kl_coef = 0.0  # grpo: beta of the KL to the frozen initial policy (0 = no reference)
    lo.kl_type = "k3"  # grpo: KL estimator k1 | k2 | k3
    lo.gspo_token_level = False  # gspo: the GSPO-token variant

    c.schedule = s = ml_collections.ConfigDict()
    s.mode = "legacy"  # alpha schedule: legacy (spec §2) | ess (Appendix A) | fixed
    s.scope = "group"  # schedule statistics per prompt group or over the batch
    s.alpha = 0.9  # alpha when mode = fixed; must lie in (0, 1]
    s.alpha_max = 0.9  # coverage end (forward-KL-like)
    s.alpha_min = 0.35  # mode-seeking end
    s.adaptive_tau = True  # tau rule of spec §2 (else tau = tau0)
    s.tau0 = 0.5  # base anchoring temperature
    s.use_ema = False  # legacy mode: smooth alpha with an EMA of momentum 0.9

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-6  # peak learning rate
    o.warmup_steps = 0  # linear warm-up, in optimizer updates
    o.decay = "constant"  # constant | cosine (to 0 at the last update)
    o.b1 = 0.9  # AdamW beta1
    o.b2 = 0.999  # AdamW beta2
    o.weight_decay = 0.01  # AdamW decoupled weight decay
    o.grad_clip = 1.0  # global-norm gradient clip (0 = off)
    o.mini_batches = 2  # optimizer updates per rollout step (prompts split evenly)
    o.micro_batches = 1  # gradient accumulation inside each update (exact, by whole groups)
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

    c.logging = lg = ml_collections.ConfigDict()
    lg.tensorboard = True  # write TensorBoard events under workdir/tensorboard
    lg.plots = True  # write PNG plots under workdir/plots at the end
    lg.progress = True  # tqdm progress bar

    if arg and "debug" in arg.split(","):
        apply_debug(c)
    return c


def apply_debug(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config to a random tiny model and a few short steps (CPU, seconds)."""
    c.model.preset, c.model.hf_dir = "tiny", ""
    c.model.vocab_size = -1  # the task's vocabulary (the real Qwen3 one for math tasks)
    c.model.dtype, c.model.param_dtype, c.model.remat = "float32", "float32", False
    c.total_steps = 2
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 2
    c.rollout.max_prompt_len = 64
    c.rollout.max_new_tokens = 8
    c.optim.lr = 1e-3
    c.checkpoint.every_steps = 0
    c.logging.tensorboard = False
    c.logging.plots = False
    c.logging.progress = False
    if c.eval.num_prompts:
        c.eval.num_prompts = 4
