"""LoRA policies (models/lora.py): fresh adapters are the base exactly (logits and samples), only
adapters get gradients (against the chain rule through the base's own gradient), micro-batches
and a (2, 2, 2) mesh change nothing, resume is exact, and the PEFT / merged exports load in
transformers + peft with equal logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from apo_jax import evaluate as evaluate_cli
from apo_jax import export
from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import hf_io, peft_io
from apo_jax.models import lora as lora_lib
from apo_jax.models import qwen3 as model_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.trainer import build, records
from apo_jax.trainer import evaluate as evaluate_lib
from apo_jax.trainer import loop as train
from apo_jax.trainer import step as ts
from configs import base, toy

CFG = model_lib.Qwen3Config.tiny()
LORA = lora_lib.LoRAConfig(rank=4, alpha=8.0, targets=tuple(lora_lib.TARGETS), seed=3)
EPS32 = float(np.finfo(np.float32).eps)


def _models(scan_layers=False, dtype=jnp.float32, lora=LORA):
    """(plain model, LoRA model on the same base weights) with fresh adapters (B = 0)."""
    kw = dict(scan_layers=scan_layers, dtype=dtype)
    return model_lib.init_model(CFG, 0, **kw), model_lib.init_model(CFG, 0, lora=lora, **kw)


def _perturbed(adapters, seed=1, scale=0.05):
    """Adapters with B != 0 too (a trained-looking adapter)."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, shape), jnp.int32)


# --- fresh adapters are the base --------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fresh_adapters_give_the_base_logits_exactly(scan_layers, dtype):
    plain, lora = _models(scan_layers, dtype)
    # 18 tokens: every adapter adds s·B(A x); 140 tokens (>= every projection's inputs): every
    # adapter is folded into its weight (lora.merge_pays). Both are the base exactly at B = 0.
    for shape in ((2, 9), (2, 70)):
        ids = _ids(shape)
        np.testing.assert_array_equal(np.asarray(lora(ids)), np.asarray(plain(ids)))
    ids = _ids((2, 9))
    # ... and the adapters exist and matter: B != 0 moves the logits.
    graphdef, params = nnx.split(lora, nnx.Param)
    adapters, frozen = lora_lib.split(params)
    names = {p[-1] for p, _ in nnx.to_flat_state(adapters)}
    assert names == {f"{t}_lora_{ab}" for _, t in lora_lib.TARGETS.values() for ab in "ab"}
    moved = nnx.merge(graphdef, lora_lib.join(frozen, _perturbed(adapters)))(ids)
    assert float(jnp.abs(moved - plain(ids)).max()) > 1e-3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_folded_and_added_adapters_agree(monkeypatch, scan_layers):
    """W x + s·B(A x) (decode steps) vs (W + s·A B) x (calls with many tokens), float32."""
    _, lora = _models(scan_layers)
    graphdef, params = nnx.split(lora, nnx.Param)
    adapters, frozen = lora_lib.split(params)
    model = nnx.merge(graphdef, lora_lib.join(frozen, _perturbed(adapters)))
    ids = _ids((2, 9))
    out = {}
    for fold in (False, True):
        monkeypatch.setattr(lora_lib, "merge_pays", lambda *a, fold=fold: fold)
        out[fold] = np.asarray(model(ids))
    # The same float32 sums in another order (D = 64 to 128 terms per entry, |logit| < 2).
    np.testing.assert_allclose(out[True], out[False], atol=128 * EPS32 * 4)
    assert np.abs(out[True]).max() > 0.1


def test_fresh_adapters_give_the_base_samples_exactly():
    plain, lora = _models()
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8], [3]]
    out = []
    for model in (plain, lora):
        graphdef, params = nnx.split(model, nnx.Param)
        sampler = sampler_lib.Sampler(
            graphdef, max_prompt_len=8, max_new_tokens=6, temperature=1.0, top_k=20
        )
        out.append(sampler.sample(params, prompts, n=3, rng=7))
    np.testing.assert_array_equal(out[0].tokens, out[1].tokens)
    np.testing.assert_array_equal(out[0].logp, out[1].logp)


# --- only the adapters train --------------------------------------------------------------------


def _config(loss="apo", micro=1, p=2, g=3):
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = g, p
    c.optim.micro_batches, c.optim.mini_batches, c.optim.grad_clip = micro, 1, 0.0
    c.loss.name = loss
    return c


def _batch(p, g, seed=0, tp=5, tc=6):
    rng = np.random.RandomState(seed)
    b = p * g
    cmask = np.ones((b, tc), np.float32)
    cmask[1, 3:] = 0
    pmask = np.ones((b, tp), np.int32)
    pmask[2, :2] = 0
    old = -4.0 + 0.3 * rng.randn(b, tc)
    return dict(
        prompt_ids=rng.randint(0, CFG.vocab_size, (b, tp)).astype(np.int32),
        prompt_mask=pmask,
        completion_ids=rng.randint(0, CFG.vocab_size, (b, tc)).astype(np.int32),
        completion_mask=cmask,
        rewards=rng.randint(0, 2, (b,)).astype(np.float32),
        old_logp=old.astype(np.float32),
        ref_logp=(old + 0.1 * rng.randn(b, tc)).astype(np.float32),
    )


def _sgd_step(model, batch, c, lora=False, mesh=None, perturb=False):
    """One SGD(lr = 1) update: the trained parameters move by minus their gradient. Returns
    (gradients, trained params before, metrics, state after)."""
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = None
    if lora:
        params, frozen = lora_lib.split(params)
        params = _perturbed(params) if perturb else params
    tx = optax.sgd(1.0)
    spec = build.step_spec(build.plan(c), CFG.vocab_size)
    state = ts.init_train_state(params, tx, 0, spec.schedule)
    if mesh is None:
        fns = ts.build(graphdef, spec, tx, frozen=frozen)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
    else:
        shardings = sharding_lib.tree_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        if frozen is not None:
            frozen = jax.device_put(frozen, sharding_lib.tree_shardings(frozen, mesh))
        fns = ts.build(graphdef, spec, tx, mesh, shardings, frozen=frozen)
        batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    old = jax.tree.map(np.asarray, jax.device_get(state.params))
    new, metrics = fns.train_step(state, records.Batch(**batch))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), old, jax.device_get(new.params))
    return grads, old, jax.device_get(metrics), new


def test_gradients_reach_only_the_adapters_and_follow_the_chain_rule():
    plain, lora = _models()
    c = _config()
    batch = _batch(2, 3)
    g_lora, adapters, _, state = _sgd_step(lora, batch, c, lora=True)
    # The state, its gradients and (AdamW's) moments hold adapters alone: the base is no leaf.
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(state.params))
    adam = optax.adamw(1e-3).init(state.params)
    assert sum(x.size for x in jax.tree.leaves(adam)) == 1 + 2 * sum(
        x.size for x in jax.tree.leaves(state.params)
    )
    # With B = 0, W_eff = W + s·A B gives dL/dB = s·Aᵀ dL/dW and dL/dA = s·dL/dW Bᵀ = 0, where
    # dL/dW is the plain model's gradient at the same weights (an independent program).
    g_full, _, _, _ = _sgd_step(plain, batch, c)
    flat_full = dict(nnx.to_flat_state(g_full))
    flat_a = dict(nnx.to_flat_state(adapters))
    for path, grad in nnx.to_flat_state(g_lora):
        name = path[-1]
        if name.endswith("_lora_a"):
            assert np.all(grad.get_value() == 0), path
            continue
        proj = name[: -len("_lora_b")]
        g_w = np.asarray(flat_full[(*path[:-1], proj)].get_value(), np.float64)
        a = np.asarray(flat_a[(*path[:-1], f"{proj}_lora_a")].get_value(), np.float64)
        k = lora_lib.IN_DIMS[proj]
        a2 = a.reshape(-1, a.shape[-1])  # [I, R]
        gw2 = g_w.reshape(int(np.prod(g_w.shape[:k])), -1)  # [I, O]
        want = LORA.scale * a2.T @ gw2  # [R, O], float64
        got = np.asarray(grad.get_value(), np.float64).reshape(want.shape)
        # Both are sums over every token of products of f32 activations and cotangents: compare
        # on the scale of Σ|terms| (tokens x I terms per entry), k = their count.
        terms = LORA.scale * np.abs(a2).T @ np.abs(gw2)
        n = batch["completion_ids"].size * a2.shape[0]
        assert np.all(np.abs(got - want) <= n * EPS32 * terms + 1e-12), path
        assert np.abs(want).max() > 0, path


@pytest.mark.slow
def test_micro_batches_and_a_2x2x2_mesh_change_nothing_under_lora():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    _, lora = _models()
    p, g = 4, 2  # rows = 8: data * fsdp = 4 divides micro-batches of 8 and 4
    batch = _batch(p, g, seed=1)
    runs = [
        _sgd_step(lora, batch, _config("apo", 1, p, g), lora=True, perturb=True),
        _sgd_step(lora, batch, _config("apo", 2, p, g), lora=True, perturb=True),
        _sgd_step(
            lora,
            batch,
            _config("apo", 1, p, g),
            lora=True,
            perturb=True,
            mesh=sharding_lib.make_mesh(2, 2, 2),
        ),
    ]
    ref_g, ref_p, ref_m, _ = runs[0]
    for got_g, _, got_m, _ in runs[1:]:
        for k in ref_m:
            # Means of O(1) terms over <= 48 tokens: rounding is a few eps of the scale.
            np.testing.assert_allclose(got_m[k], ref_m[k], rtol=1e-5, atol=64 * EPS32, err_msg=k)
        for a, b, w in zip(
            jax.tree.leaves(ref_g), jax.tree.leaves(got_g), jax.tree.leaves(ref_p), strict=True
        ):
            # Sums over <= 48 tokens reordered: ~n·eps of the leaf's scale, plus 2 eps·|param|
            # from reading the gradient as old - new.
            tol = 1e-5 * float(np.abs(a).max()) + 2 * EPS32 * np.abs(w) + 1e-12
            assert np.all(np.abs(b - a) <= tol)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("targets", "q,x", r"config.model.lora.targets='q,x'.*'x' is none of them"),
        ("targets", "", r"config.model.lora.targets=''"),
        ("targets", "q,q", r"named twice"),
        ("base_dtype", "int8", r"config.model.lora.base_dtype='int8'"),
        ("alpha", 0.0, r"config.model.lora.alpha=0.0"),
        ("rank", -1, r"config.model.lora.rank=-1"),
        ("peft_dir", "/nonexistent", r"config.model.lora.peft_dir=.*rank > 0"),
    ],
)
def test_bad_lora_keys_are_named(key, value, match):
    c = _config()
    c.model.lora[key] = value
    with pytest.raises(ValueError, match=match):
        build.plan(c)


# --- the loop: resume, checkpoint contents, export ----------------------------------------------


def _toy(**over):
    c = toy.get_config("debug")
    c.mesh.data, c.total_steps, c.checkpoint.every_steps = 1, 4, 2
    c.model.lora.rank, c.model.lora.base_dtype = 4, "float32"
    # A KL term: the reference (the base, adapters off) is scored too. One update per step, so
    # step 1 trains from fresh adapters: policy = reference exactly, KL exactly 0.
    c.loss.name, c.loss.grpo.kl_coef, c.optim.mini_batches = "grpo", 0.04, 1
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return c


def _lines(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith("perf/")} for x in f]


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_checkpoints_hold_adapters_only(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # No in-run evaluation: a run always evaluates its last step, so the run stopped at step 2
    # would log an evaluation there that the straight run does not (training is what is compared).
    no_eval = {"eval.num_prompts": 0}
    train.run(_toy(**no_eval), str(straight))
    train.run(_toy(total_steps=2, **no_eval), str(split))
    train.run(_toy(**no_eval), str(split))
    assert _lines(straight) == _lines(split)
    ck = checkpoint_lib.Checkpointer(str(split), every_steps=2, keep=3)
    state = ck.manager.restore(4).state
    n_adapters = 2 * CFG.num_layers * len(lora_lib.TARGETS)
    assert len(jax.tree.leaves(state["params"])) == n_adapters  # no base weight is saved
    ck.close()
    # The reference is the base: KL 0 exactly before the first update, > 0 once adapters moved.
    kl = [x["loss/kl_ref"] for x in _lines(split)]
    assert kl[0] == 0.0 and kl[-1] > 0.0, kl

    # The evaluation CLI and the exports read the run (adapters from the checkpoint + the base).
    res = evaluate_cli.run(_toy(), workdir=str(split), k=2, num_prompts=4, out=str(tmp_path / "e"))
    assert res["source"]["step"] == 4 and res["metrics"]
    assert export.export(str(split), str(tmp_path / "merged"), "merged") == 4
    assert export.export(str(split), str(tmp_path / "peft"), "peft") == 4
    p = build.plan(_toy())
    cfg = build.model_config(p, build.task(p).vocab_size)
    graphdef, params, _ = evaluate_lib.restore_params(p, cfg, str(split))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 7)), jnp.int32)
    ours = nnx.merge(graphdef, params)(ids)
    merged = hf_io.load_model(tmp_path / "merged")(ids)
    # float32 logits of W x + s·B(A x) vs (W + s·A B) x: a few eps of the terms (|logit| < 10).
    np.testing.assert_allclose(np.asarray(merged), np.asarray(ours), atol=1e-5)
    # A PEFT directory is a starting point: model.lora.peft_dir gives the trained adapters.
    _, started = build.model(
        build.plan(_toy(**{"model.lora.peft_dir": str(tmp_path / "peft")})),
        cfg,
        sharding_lib.make_mesh(1, 1, 1),
    )
    for a, b in zip(
        jax.tree.leaves(lora_lib.split(params)[0]),
        jax.tree.leaves(lora_lib.split(started)[0]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_different_base_refuses_to_resume(tmp_path):
    p = build.plan(_toy())
    with pytest.raises(ValueError, match="different base"):
        build.check_base(p, {"lora_base": {"config_sha256": "0" * 64}}, str(tmp_path))
    build.check_base(p, {"lora_base": {}}, str(tmp_path))  # random init: nothing to check


# --- PEFT and merged exports against transformers + peft ----------------------------------------


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("scan_layers", [False, True])
def test_merged_and_peft_exports_load_in_transformers_and_peft(hf_tiny, tmp_path, scan_layers):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft", reason="peft (the `lora` extra) loads the adapter dir")
    path, hf_base = hf_tiny()
    cfg = hf_io.load_model(path).cfg
    lora = lora_lib.LoRAConfig(rank=4, alpha=16.0, targets=("q", "v", "o", "down"), seed=1)
    loaded = hf_io.load_model(path, scan_layers=scan_layers)
    shell = model_lib.init_model(cfg, 0, scan_layers=scan_layers, lora=lora)
    graphdef, params = nnx.split(shell, nnx.Param)
    adapters = _perturbed(lora_lib.split(params)[0], scale=0.1)
    params = lora_lib.join(nnx.state(loaded, nnx.Param), adapters)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(ids)))
    assert np.abs(ours - _hf_logits(hf_base, ids)).max() > 1e-3  # the adapters matter
    # f32 logits of a 2-layer model with |logit| ~ 1: a few hundred eps of the scale.
    atol = 1e-4

    peft_io.save_merged(params, lora, cfg, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_hf_logits(merged, ids), ours, atol=atol)

    peft_io.save_adapters(params, lora, tmp_path / "peft", base=str(path))
    config = json.loads((tmp_path / "peft" / peft_io.CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16.0
    wrapped = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    np.testing.assert_allclose(_hf_logits(wrapped, ids), ours, atol=atol)
    wrapped.unload()  # hf_base is shared by other tests: take the adapters off again

    # ... and back: the imported adapters are the exported ones, bit for bit.
    fresh = lora_lib.split(params)[0]
    back = peft_io.load_adapters(str(tmp_path / "peft"), jax.tree.map(jnp.zeros_like, fresh), lora)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = lora_lib.LoRAConfig(rank=8, alpha=16.0, targets=lora.targets)
    with pytest.raises(ValueError, match=r"r=4, but model.lora.rank is 8"):
        peft_io.load_adapters(str(tmp_path / "peft"), fresh, other)
    other = lora_lib.LoRAConfig(rank=4, alpha=16.0, targets=("q", "v"))
    with pytest.raises(ValueError, match=r"target_modules="):
        peft_io.load_adapters(str(tmp_path / "peft"), fresh, other)


@pytest.mark.slow
def test_a_lora_toy_run_learns_like_the_full_run(tmp_path):
    """The embedded task from the same base, full fine-tune vs LoRA rank 16 on every projection,
    40 steps at the toy's lr each. The base is a tiny random model whose final-norm scale is 8:
    with the scale at 1 its logits are near uniform over the 13 tokens (|logit| <= |h|·|e| ~ 1)
    and, the LM head and norms being frozen, no adapter can sharpen them (measured: entropy
    stuck at 2.51); a trained base has logits of that range. Band: both runs gain > 0.1 in mean
    reward (first 8 vs last 8 steps) and LoRA gains at least half what the full run gains
    (measured on this CPU: full 0.14 -> 0.31, LoRA 0.11 -> 0.48)."""
    model = model_lib.init_model(model_lib.Qwen3Config.tiny(vocab_size=13), 0)
    model.norm.scale[...] = model.norm.scale[...] * 8.0
    hf_io.save_model(model, tmp_path / "base")
    gains = {}
    for name, rank in (("full", 0), ("lora", 16)):
        c = toy.get_config()
        c.mesh.data, c.total_steps, c.model.hf_dir = 1, 40, str(tmp_path / "base")
        c.model.lora.rank, c.model.lora.base_dtype = rank, "float32"
        c.eval.num_prompts, c.logging.plots, c.logging.progress = 0, False, False
        train.run(c, str(tmp_path / name))
        rewards = [x["reward/mean"] for x in _lines(tmp_path / name)]
        gains[name] = float(np.mean(rewards[-8:]) - np.mean(rewards[:8]))
    assert gains["full"] > 0.1 and gains["lora"] > 0.1, gains
    assert gains["lora"] >= 0.5 * gains["full"], gains
