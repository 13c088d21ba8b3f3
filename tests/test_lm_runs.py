"""Language-model runs end to end: the presets, LoRA's noise dimension, model.init_from,
and fast clipping on the transformer (issue 15).

Configs are composed with Hydra's compose API as ``dpjax-train`` does; runs are seeded
(``dp.randomness=seeded``) so that they are reproducible. Besides ``lm_quick`` itself,
the runs use a tiny transformer (1 layer, width 32, context 32) for a few steps:
compilation dominates their time.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

ROOT = Path(__file__).resolve().parent.parent
SEEDED = ["dp.randomness=seeded"]
TINY = ["model.options.num_layers=1", "model.options.width=32", "model.options.num_heads=2",
        "model.options.mlp_ratio=2", "dataset.options.context_length=32",
        "train.batch_size=16", "train.eval_every=2", "train.log_every=2",
        "train.eval_batch_size=64"]
TINY_PRIVATE = ["dataset.options.num_records=200"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    import dpjax.cli  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=[*SEEDED, *overrides]))


def lora_size(width: int, mlp_width: int, rank: int, num_layers: int) -> int:
    """Adapter parameters of a DecoderLM counted from its shapes: rank * (in + out) for
    the query, key, value and output projections and the two MLP kernels of each block."""
    per_block = 4 * rank * (width + width) + 2 * rank * (width + mlp_width)
    return num_layers * per_block


def read_checkpoint_params(run_dir: Path):
    """The final parameters in a run's checkpoint, read with orbax directly."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    return state["params"]


@pytest.mark.slow
def test_lm_quick_trains_a_dp_lora_model_within_its_target_epsilon(tmp_path):
    from dpjax.loop import run_training

    cfg = compose(["experiment=lm_quick"])
    summary = run_training(cfg, tmp_path)
    assert summary["dataset"] == "private_text" and summary["model"] == "transformer"
    assert summary["dp_enabled"] and summary["stopped_reason"] == "completed"
    assert summary["steps"] == cfg.train.steps
    assert summary["epsilon"] <= cfg.dp.target_epsilon == 8.0
    assert summary["epsilon"] > 0.9 * cfg.dp.target_epsilon  # calibrated, not loose
    bpb = summary["test_bits_per_byte"]
    # better than a uniform guess over the 259 tokens: the adapters learned something
    assert math.isfinite(bpb) and 0 < bpb < math.log2(259)
    assert 0 < summary["test_accuracy"] < 1
    assert summary["trainable"] == "lora"
    assert summary["num_trainable_params"] == lora_size(64, 128, 4, 1)
    assert summary["init_from"] is None
    assert summary["generator_version"].startswith("faker==")


@pytest.mark.slow
def test_a_lora_dp_step_noises_the_adapters_only(tmp_path):
    """Mask every row: the update is the noise alone (SGD, learning rate 1), on exactly
    the adapter leaves; the frozen base is bit-identical after the step. The noise's
    standard deviation over its d = 1,792 coordinates is sigma * C / B within 4
    standard errors (relative standard error of a sample std: 1/sqrt(2d))."""
    from dpjax.assembly import assemble

    cfg = compose(["experiment=lm_quick", *TINY, *TINY_PRIVATE, "model.options.lora_rank=4",
                   "dp.target_epsilon=null", "dp.noise_multiplier=1.5", "dp.l2_clip_norm=0.5",
                   "optimizer=sgd", "optimizer.learning_rate=1.0"])
    run, state = assemble(cfg, tmp_path)
    d = lora_size(32, 64, 4, 1)
    assert run.mechanism.num_params == d
    flat = traverse_util.flatten_dict(state.params)
    assert all(path[-1] in ("lora_a", "lora_b") for path in flat)
    assert sum(v.size for v in flat.values()) == d

    setup = run.task.lm
    before_full = traverse_util.flatten_dict(jax.device_get(setup.full_params(state.params)))
    before = jax.device_get(state.params)
    b = run.physical_batch_size
    batch = (jnp.asarray(run.task.x_train[:b]), jnp.asarray(run.task.y_train[:b]))
    new, _ = run.step_fn.step(state, batch, jnp.zeros(b))
    after_full = traverse_util.flatten_dict(jax.device_get(setup.full_params(new.params)))
    for path, value in before_full.items():
        if path[-1] not in ("lora_a", "lora_b"):
            np.testing.assert_array_equal(after_full[path], value, err_msg=str(path))
    flat_before = traverse_util.flatten_dict(before)
    noise = np.concatenate([np.ravel(np.asarray(v) - np.asarray(flat_before[k])) for k, v in
                            traverse_util.flatten_dict(jax.device_get(new.params)).items()])
    assert noise.size == d
    expected = 1.5 * 0.5 / cfg.train.batch_size
    assert abs(noise.std() / expected - 1) < 4 / math.sqrt(2 * d)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(d)


def _pretrain(out: Path) -> dict:
    from dpjax.loop import run_training

    return run_training(compose(["experiment=lm_pretrain", *TINY, "train.steps=2"]), out)


@pytest.mark.slow
def test_a_fine_tune_starts_from_its_source_and_records_it(tmp_path):
    """The fine-tune's summary fields come from the task's ``lm`` setup (the loop passes
    them on, as the lm_quick test checks end to end); building the task is enough."""
    from dpjax.lm_task import summary_fields
    from dpjax.task import build_task

    source_dir = tmp_path / "pretrain"
    source = _pretrain(source_dir)
    assert not source["dp_enabled"] and source["corpus_hash"]
    saved = traverse_util.flatten_dict(read_checkpoint_params(source_dir))

    task = build_task(compose(["experiment=lm_dp_finetune", *TINY, *TINY_PRIVATE,
                               "model.options.lora_rank=4", f"model.init_from={source_dir}"]))
    start = traverse_util.flatten_dict(jax.device_get(task.lm.full_params(task.params)))
    base = {k: v for k, v in start.items() if k[-1] not in ("lora_a", "lora_b")}
    assert set(base) == set(saved)
    for path, value in saved.items():
        np.testing.assert_array_equal(base[path], np.asarray(value), err_msg=str(path))
    lora_b = [v for k, v in start.items() if k[-1] == "lora_b"]
    assert lora_b and not any(np.any(v) for v in lora_b)  # fresh adapters: same function

    fields = summary_fields(task.lm)
    assert fields["init_from"] == str(source_dir)
    assert fields["init_from_dataset"] == "pydoc_text"
    assert fields["init_from_randomness"] == "seeded"  # these test runs are seeded
    assert fields["init_from_dp_enabled"] is False and fields["init_from_epsilon"] is None
    assert fields["trainable"] == "lora"


@pytest.mark.slow
def test_a_dp_fine_tune_from_a_non_private_run_on_its_own_records_is_refused(tmp_path):
    from dpjax.config import ConfigError
    from dpjax.loop import run_training

    source_dir = tmp_path / "leaky"
    run_training(compose(["experiment=lm_nonprivate_finetune", *TINY, *TINY_PRIVATE,
                          "train.steps=1"]), source_dir)
    dp = ["experiment=lm_dp_finetune", *TINY, *TINY_PRIVATE, "model.options.lora_rank=4",
          f"model.init_from={source_dir}", "train.steps=1"]
    with pytest.raises(ConfigError, match="not to be trained on this run's private records"):
        run_training(compose(dp), tmp_path / "refused")
    assert not (tmp_path / "refused" / "summary.json").exists()
    # other private records (another corpus seed) are not the run's own: accepted
    from dpjax.lm_task import summary_fields
    from dpjax.task import build_task

    assert build_task(compose([*dp, "dataset.options.seed=1"])).lm.source.dataset == \
        "private_text"
    # Laundering through a public run: continue pre-training on the public corpus from the
    # leaky run, then fine-tune with DP from that. The public run's checkpoint carries the
    # chain, so the DP run on the leaky run's records is still refused (it was accepted
    # before the chain was recorded: only the direct source was checked).
    public_dir = tmp_path / "public_from_leaky"
    run_training(compose(["experiment=lm_pretrain", *TINY, f"model.init_from={source_dir}",
                          "train.steps=1"]), public_dir)
    # the public run's checkpoint names the leaky run but holds none of its record hashes
    from dpjax import checkpoint
    from dpjax.init_from import PROVENANCE, RECORD_DIGESTS

    leaky_digests = checkpoint.read_meta(source_dir / "checkpoints")[RECORD_DIGESTS]
    public_meta = checkpoint.read_meta(public_dir / "checkpoints")
    assert [o["path"] for o in public_meta[PROVENANCE]] == [str(source_dir.absolute())]
    assert leaky_digests and leaky_digests[:16] not in str(public_meta)
    laundered = [*dp[:-2], f"model.init_from={public_dir}", "train.steps=1"]
    with pytest.raises(ConfigError, match="through the chain of sources") as refused:
        build_task(compose(laundered))
    assert str(source_dir) in str(refused.value) and "without DP" in str(refused.value)
    # on other records it is accepted, and the summary names the whole chain
    fields = summary_fields(build_task(compose([*laundered, "dataset.options.seed=1"])).lm)
    assert fields["init_from_dataset"] == "pydoc_text"
    assert fields["init_from_randomness"] == "seeded"  # these test runs are seeded
    [leaky] = fields["init_from_ancestors"]
    assert leaky["dataset"] == "private_text" and leaky["dp_enabled"] is False
    assert leaky["path"] == str(source_dir.absolute()) and leaky["randomness"] == "seeded"


def test_a_copy_of_the_sources_records_under_another_path_is_refused(tmp_path, caplog):
    """Records are compared by content: the same lines in a copied file (another path, so
    the configurations differ) are found by the source checkpoint's record digests."""
    from dpjax.config import ConfigError
    from dpjax.loop import run_training
    from dpjax.task import build_task

    lines = [f"patient {i} was seen on day {i % 28 + 1} for condition {i % 7}" for i in range(60)]
    original = tmp_path / "a" / "notes.txt"
    original.parent.mkdir()
    original.write_text("\n".join(lines) + "\n")
    copy = tmp_path / "b" / "notes_copy.txt"
    copy.parent.mkdir()
    copy.write_text("\n".join(reversed(lines)) + "\n")  # same records, another order
    other = tmp_path / "c" / "others.txt"
    other.parent.mkdir()
    other.write_text("\n".join(f"account {i} paid {i * 7} euros" for i in range(60)) + "\n")
    # rotary positions: no parameter depends on the context length, so the DP run may use
    # another one (16 here, 32 in the source): the digests hash whole records, not rows
    text = ["dataset=text", "model.options.positions=rotary"]
    source_dir = tmp_path / "leaky"
    source_cfg = compose(["experiment=lm_nonprivate_finetune", *TINY, *text,
                          f"dataset.options.path={original}", "train.steps=1"])
    run_training(source_cfg, source_dir)
    dp = ["experiment=lm_dp_finetune", *TINY, *text, "dataset.options.context_length=16",
          "model.options.lora_rank=4", f"model.init_from={source_dir}", "train.steps=1"]
    with pytest.raises(ConfigError, match=r"was trained on \d+ of this run's records"):
        build_task(compose([*dp, f"dataset.options.path={copy}"]))
    assert build_task(compose([*dp, f"dataset.options.path={other}"])).lm.source is not None
    # the digests (unkeyed hashes of private records) stay in the owner-only checkpoint
    from dpjax import checkpoint
    from dpjax.init_from import DIGEST_CHARS, RECORD_DIGESTS

    _, meta, _ = checkpoint.read_params(source_dir / "checkpoints")
    digests = meta[RECORD_DIGESTS]
    assert digests == "".join(build_task(source_cfg).lm.corpus.train_digests)
    assert len(digests) == DIGEST_CHARS * 48  # the 48 training records of 60 lines
    for public in ("summary.json", "metrics.jsonl"):
        written = (source_dir / public).read_text()
        assert not any(digests[i:i + DIGEST_CHARS] in written
                       for i in range(0, len(digests), DIGEST_CHARS))
    # a file's test split is the user's own records: the run says its metrics are not covered
    assert "test split is 6 of your records" in caplog.text
    assert "not covered by epsilon" in caplog.text


# clip bounds between the rows' norms (seeded init, fixed rows): some rows clipped, some not
CLIP = {"full": 4.0, "lora": 2.0}


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_fast_clipping_equals_vmap_clipping_on_the_lm(trainable):
    """Masked rows and short (padded) records; no leaf falls back to vmap.

    LoRA's adapters take the direct branch: norms and sums agree to rtol 1e-5. The
    full model's output head and embedding take the ghost branch, whose reported norm
    adds the rounding bound of docs/fast_clipping.md ("Rounding error of the ghost
    norm") when that bound is not negligible: never below the vmap norm, at most
    1e-4 (the documented rho) above it; each row's clipped contribution then differs
    by at most 1e-4 * C, so the sums differ by at most 1e-4 * C * (rows kept).
    """
    import dpjax
    from dpjax import fast_clipping
    from dpjax.data.text import EOS, PAD
    from dpjax.task import build_task

    rank = 4 if trainable == "lora" else 0
    task = build_task(compose(["experiment=lm_quick", *TINY, *TINY_PRIVATE,
                               f"model.options.lora_rank={rank}",
                               f"model.options.trainable={trainable}"]))
    tokens = np.array(task.x_train[:8])
    lengths = np.array(task.y_train[:8])
    for row, length in ((1, 3), (2, 9), (5, 1)):  # short records: BOS + a few bytes + EOS
        tokens[row, length - 1] = EOS if length > 1 else tokens[row, 0]
        tokens[row, length:] = PAD
        lengths[row] = length
    batch = (jnp.asarray(tokens), jnp.asarray(lengths))
    mask = jnp.asarray([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)
    assert fast_clipping.discover(task.loss_fn, task.params, batch).fallbacks() == {}
    clip = CLIP[trainable]
    vmap_sum, vmap_norms = dpjax.clipped_grad(task.loss_fn, l2_clip_norm=clip, method="vmap")(
        task.params, batch, mask)
    fast_sum, fast_norms = dpjax.clipped_grad(task.loss_fn, l2_clip_norm=clip, method="fast")(
        task.params, batch, mask)
    vmap_norms, fast_norms = np.asarray(vmap_norms), np.asarray(fast_norms)
    kept = np.asarray(mask) > 0
    assert np.sum(kept & (vmap_norms > clip)) >= 2 and np.sum(kept & (vmap_norms < clip)) >= 2
    assert vmap_norms[5] == fast_norms[5] == 0  # a record of BOS alone predicts nothing
    if trainable == "lora":
        np.testing.assert_allclose(fast_norms, vmap_norms, rtol=1e-5)
        for (path, f), v in zip(jax.tree_util.tree_leaves_with_path(fast_sum),
                                jax.tree_util.tree_leaves(vmap_sum), strict=True):
            np.testing.assert_allclose(f, v, rtol=1e-5, atol=1e-7, err_msg=str(path))
    else:
        assert np.all(fast_norms >= vmap_norms * (1 - 1e-6))
        assert np.all(fast_norms <= vmap_norms * (1 + 1e-4))
        diff = np.sqrt(sum(float(np.sum((np.asarray(f) - np.asarray(v)) ** 2)) for f, v in zip(
            jax.tree_util.tree_leaves(fast_sum), jax.tree_util.tree_leaves(vmap_sum),
            strict=True)))
        assert diff <= 1e-4 * clip * kept.sum()


def test_check_source_compares_every_private_origin_by_content_and_skips_public_ones(caplog):
    """No training: the rule itself. A canary set trained into a source on other records
    (another corpus seed) shares the audit's canary records, so it is refused too."""
    from dpjax.config import ConfigError
    from dpjax.data.canaries import make_canaries
    from dpjax.data.text import load_private_text
    from dpjax.init_from import Origin, Source, check_source

    canaries = make_canaries(seed=0, repetitions=(1,), canaries_per_repetition=2, num_fresh=1,
                             secret_length=4)

    def digests(seed, with_canaries):
        return load_private_text(num_records=60, seed=seed, context_length=32,
                                 canaries=canaries if with_canaries else None).train_digests

    audit_run = digests(0, True)

    def source(dataset, seed, with_canaries, dp=False):
        origin = Origin(path=f"/runs/{dataset}{seed}", dataset=dataset,
                        dataset_options={"seed": seed}, dp_enabled=dp,
                        epsilon=2.0 if dp else None, delta=1e-5 if dp else None, steps=1,
                        digests=digests(seed, with_canaries))
        public = Origin(path="/runs/pretrain", dataset="pydoc_text", dataset_options={},
                        dp_enabled=False, epsilon=None, delta=None, steps=1,
                        digests=audit_run)  # a public origin is never compared
        return Source(path=public.path, params=None, dataset=public.dataset,
                      dataset_options={}, dp_enabled=False, epsilon=None, delta=None,
                      steps=1, origins=(public, origin))

    def check(src, dp_enabled=True):
        check_source(src, dataset="private_text", dataset_options={"seed": 0},
                     dp_enabled=dp_enabled, public_datasets=("pydoc_text",),
                     digests=audit_run)

    check(source("private_text", 1, with_canaries=False))  # other records: accepted
    with pytest.raises(ConfigError, match=r"was trained on 2 of this run's records without DP"):
        check(source("private_text", 1, with_canaries=True))  # the audit's 2 canaries
    with pytest.raises(ConfigError, match=r"through the chain.*with DP \(epsilon 2\)"):
        check(source("private_text", 0, with_canaries=False, dp=True))  # same seed
    check(source("private_text", 0, with_canaries=True), dp_enabled=False)  # claims nothing
    # an origin without readable digests is compared by configuration only, and said so
    import dataclasses

    blind = source("private_text", 1, with_canaries=True)
    blind = dataclasses.replace(blind, origins=(
        blind.origins[0], dataclasses.replace(blind.origins[1], digests=None)))
    check(blind)
    assert "by configuration only" in caplog.text


def test_user_level_dp_is_refused_for_a_language_model():
    """Records have no users: the label-skew partition would group them by length."""
    from dpjax.assembly import assemble_parts
    from dpjax.config import ConfigError

    with pytest.raises(ConfigError, match=r"dp.unit='example' with dataset='private_text'"):
        assemble_parts(compose(["experiment=lm_quick", *TINY, *TINY_PRIVATE, "dp.unit=user"]))


def test_resuming_after_the_source_has_changed_is_refused(tmp_path):
    """The source is read again when a run resumes: if it now holds other parameters (it
    trained on, or was replaced), the adapters would continue on another frozen base."""
    import shutil

    from dpjax.checkpoint import CheckpointError
    from dpjax.loop import run_training
    from dpjax.task import build_task

    pre = ["experiment=lm_pretrain", *TINY, "train.steps=1"]
    source, other = tmp_path / "source", tmp_path / "other"
    run_training(compose(pre), source)
    run_training(compose([*pre, "train.seed=1"]), other)
    tune = compose(["experiment=lm_nonprivate_finetune", *TINY, *TINY_PRIVATE,
                    "model.options.lora_rank=4", "model.options.trainable=lora",
                    f"model.init_from={source}", "train.steps=1"])
    run_training(tune, tmp_path / "tune")
    from dpjax import checkpoint
    from dpjax.lm_task import SOURCE_START

    _, meta, _ = checkpoint.read_params(tmp_path / "tune" / "checkpoints")
    assert meta[SOURCE_START] == build_task(tune).lm.source_start()
    run_training(tune, tmp_path / "tune")  # resuming a finished run from the same source: fine
    shutil.rmtree(source)
    shutil.copytree(other, source)
    with pytest.raises(CheckpointError, match="now holds step 1 with other parameters"):
        run_training(tune, tmp_path / "tune")
    assert (tmp_path / "tune" / "checkpoints").is_dir()  # nothing of the run was removed
    # a run starting from the LoRA tune rebuilds its frozen base from the (replaced) source
    from dpjax.config import ConfigError

    with pytest.raises(ConfigError, match="frozen base cannot be rebuilt"):
        build_task(compose(["experiment=lm_dp_finetune", *TINY, *TINY_PRIVATE,
                            "dataset.options.seed=1", "model.options.lora_rank=4",
                            f"model.init_from={tmp_path / 'tune'}", "train.steps=1"]))
