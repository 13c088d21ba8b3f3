"""Data-parallel DP-SGD: the sharded step equals the single-device step.

The pytest process has already started JAX with one CPU device, so the
comparisons on 8 devices run this file as a script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; it prints one JSON
line of results.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
NUM_DEVICES = 8
RTOL, ATOL = 1e-5, 1e-6
CONV_MODELS = ("cnn1d", "dp_cnn")


def _env(num_devices):
    path = os.environ.get("PYTHONPATH")
    return {**os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
            "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


# ---- the subprocess: runs with 8 host devices ------------------------------------------

def _compare_sharded_and_single(clipping_method, sampler, optimizer_name, steps=3,
                                model_name="mlp", num_devices=None):
    import jax
    import optax

    from dpjax import distributed
    from dpjax.models import CNN1D, DPCNN, MLP
    from dpjax.train import cross_entropy_loss, init_state, make_dp_step

    model, input_shape = {
        "mlp": (MLP(num_classes=10, hidden=(16,)), (6, 6, 1)),
        # convolutions: XLA's own partitioning of their batched gradients was wrong on CPU
        "cnn1d": (CNN1D(num_classes=10, channels=(8, 8), groups=4), (40, 1)),
        "dp_cnn": (DPCNN(num_classes=10), (16, 16, 1)),
    }[model_name]
    rng = np.random.RandomState(0)
    x = rng.randn(sampler.num_examples, *input_shape).astype(np.float32)
    y = rng.randint(0, 10, sampler.num_examples).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    opt = optax.adam(0.05) if optimizer_name == "adam" else optax.sgd(0.5)
    dp_step = make_dp_step(cross_entropy_loss(model.apply), opt, noise_multiplier=1.0,
                           l2_clip_norm=0.5, expected_batch_size=sampler.expected_batch_size,
                           clipping_method=clipping_method)
    mesh = distributed.make_mesh(jax.devices()[:num_devices])
    sharded_step = distributed.shard_step(dp_step, mesh)
    single = init_state(params, opt, seed=7)
    sharded = distributed.replicate(init_state(params, opt, seed=7), mesh)
    num_chunks, padded_rows = [], 0
    for t in range(steps):
        chunks = sampler.sample(t)
        num_chunks.append(len(chunks))
        single, _ = dp_step.run(single, distributed.place_chunks(chunks, x, y, None))
        placed = distributed.place_chunks(chunks, x, y, mesh)
        padded_rows += int(sum(np.sum(np.asarray(mask) == 0) for _, mask in placed))
        batch_spec = placed[0][1].sharding.spec
        sharded, _ = sharded_step.run(sharded, placed)
    leaves = zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded),
                 strict=True)
    worst = 0.0
    for a, b in leaves:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b) / (ATOL + RTOL * np.abs(a)), initial=0)))
    return {"worst_ratio": worst, "num_chunks": num_chunks, "padded_rows": padded_rows,
            "batch_spec": list(batch_spec),
            "replicated": bool(jax.tree_util.tree_leaves(sharded.params)[0]
                               .sharding.is_fully_replicated),
            "same_step": int(single.step) == int(sharded.step) == steps}


def _compare_secagg_on_two_devices(steps=4):
    """SecAgg over a 2-device mesh vs one device: 4 parties (2 per device), a physical size
    the Poisson batches overflow, so some steps take several chunks; rounds are counted."""
    import jax
    import optax

    from dpjax import aggregation, distributed
    from dpjax.aggregation import SecAggSettings
    from dpjax.models import MLP
    from dpjax.sampling import PoissonSampler
    from dpjax.train import cross_entropy_loss, init_state, make_secagg_dp_step

    rounds, real = [], aggregation.prepare_round

    def counting(*args, **kw):
        rounds.append(kw["round_index"])
        return real(*args, **kw)

    aggregation.prepare_round = counting
    sampler = PoissonSampler(300, 0.1, 24, seed=5, num_parties=4)  # the shard layout
    rng = np.random.RandomState(0)
    x = rng.randn(300, 6, 6, 1).astype(np.float32)
    y = rng.randint(0, 10, 300).astype(np.int32)
    model = MLP(num_classes=10, hidden=(16,))
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    opt = optax.sgd(0.5)
    step = make_secagg_dp_step(cross_entropy_loss(model.apply), opt, noise_multiplier=1.0,
                               l2_clip_norm=0.5, expected_batch_size=30.0,
                               physical_batch_size=24,
                               settings=SecAggSettings(4, mode="simulation", seed=3))
    mesh = distributed.make_mesh(jax.devices()[:2])
    sharded_step = distributed.shard_step(step, mesh)
    single = init_state(params, opt, seed=7)
    sharded = distributed.replicate(init_state(params, opt, seed=7), mesh)
    num_chunks, worst = [], 0.0
    for t in range(steps):
        chunks = sampler.sample(t)
        num_chunks.append(len(chunks))
        single, _ = step.run(single, distributed.place_chunks(chunks, x, y, None))
        sharded, _ = sharded_step.run(sharded, distributed.place_chunks(chunks, x, y, mesh))
    for a, b in zip(jax.tree_util.tree_leaves(single.params),
                    jax.tree_util.tree_leaves(sharded.params), strict=True):
        worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    max_chunks = max(num_chunks)
    # each run's sums are within n/scale of the float sum per coordinate (times the chunks
    # a party's sum spans); one SGD step moves a parameter by lr/B times that
    bound = steps * 0.5 * 2 * max_chunks * step.aggregation.error_bound / 30.0 + 1e-6
    return {"worst": worst, "bound": bound, "num_chunks": num_chunks,
            "rounds": rounds, "steps": steps}


def _script():
    import importlib.util

    import jax

    from dpjax.sampling import FixedSizeSampler, PoissonSampler

    methods = ["vmap"]
    if importlib.util.find_spec("dpjax.fast_clipping") is not None:
        methods.append("fast")
    cases = {
        # ~15 rows of a 16-row physical batch: padded rows on most devices
        "poisson_padded": (PoissonSampler(300, 0.05, 16, seed=1), "sgd"),
        # physical 8 < batch: ~40 chunks summed before the one noise draw. Many
        # sharded calls per step also catch calls left in flight together,
        # which deadlock XLA:CPU's collectives (see distributed._one_at_a_time).
        "poisson_chunks": (PoissonSampler(2000, 0.16, 8, seed=2), "adam"),
        # 12 rows padded to 16 = 2 per device
        "fixed_size": (FixedSizeSampler(300, 12, seed=3), "adam"),
    }
    out = {"num_devices": jax.device_count(), "methods": methods}
    for method in methods:
        for name, (sampler, opt) in cases.items():
            print(f"case {method}/{name}", file=sys.stderr, flush=True)
            out[f"{method}/{name}"] = _compare_sharded_and_single(method, sampler, opt)
        for model_name in CONV_MODELS:
            print(f"case {method}/{model_name}", file=sys.stderr, flush=True)
            # two devices suffice: the rows of device 1 got zero gradients (compiling the
            # conv programs for 8 devices would cost minutes of the suite)
            out[f"{method}/{model_name}"] = _compare_sharded_and_single(
                method, PoissonSampler(200, 0.08, 24, seed=4), "sgd", steps=1,
                model_name=model_name, num_devices=2)
    print("case secagg", file=sys.stderr, flush=True)
    out["secagg"] = _compare_secagg_on_two_devices()
    print(json.dumps(out))


# ---- the tests ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eight_devices():
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                          timeout=900, env=_env(NUM_DEVICES), cwd=ROOT)
    # XLA's fatal errors put long stack traces last: show the first lines as well.
    assert proc.returncode == 0, proc.stderr[:2000] + "\n...\n" + proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_subprocess_has_8_devices(eight_devices):
    assert eight_devices["num_devices"] == NUM_DEVICES


@pytest.mark.parametrize("case", ["poisson_padded", "poisson_chunks", "fixed_size"])
def test_sharded_dp_step_equals_the_single_device_step(eight_devices, case):
    for method in eight_devices["methods"]:
        r = eight_devices[f"{method}/{case}"]
        assert r["same_step"]
        assert r["batch_spec"] == ["batch"] and r["replicated"]
        # |single - sharded| <= ATOL + RTOL |single| for every parameter and moment
        assert r["worst_ratio"] <= 1.0, (method, r)


@pytest.mark.parametrize("model_name", CONV_MODELS)
def test_sharded_conv_models_equal_the_single_device_step(eight_devices, model_name):
    """Every device's rows get their own per-example gradients (rows on devices 1-7 got
    zero gradients when XLA partitioned the vmapped conv gradient itself)."""
    for method in eight_devices["methods"]:
        r = eight_devices[f"{method}/{model_name}"]
        assert r["same_step"] and r["replicated"]
        assert r["worst_ratio"] <= 1.0, (method, model_name, r)


def test_secagg_on_two_devices_equals_one_device_with_one_round_per_step(eight_devices):
    """dp.aggregation=secagg runs data-parallel: each device holds whole parties, and the
    parties of all devices meet in one SecAgg round per step (never a round per device or
    per chunk, which would show the aggregator partial sums)."""
    r = eight_devices["secagg"]
    assert max(r["num_chunks"]) >= 2  # an overflowing batch is among the steps
    # one round per step per run (single-device and sharded), indexed by the step
    assert r["rounds"] == [t for t in range(r["steps"]) for _ in range(2)]
    assert r["worst"] <= r["bound"], r


def test_the_cases_exercise_padding_and_several_chunks(eight_devices):
    assert eight_devices["vmap/poisson_padded"]["padded_rows"] > 0
    assert min(eight_devices["vmap/poisson_chunks"]["num_chunks"]) >= 30
    assert eight_devices["vmap/fixed_size"]["padded_rows"] == 3 * 4


def test_a_physical_size_that_does_not_divide_over_the_devices_is_refused():
    from dpjax import distributed
    from dpjax.config import ConfigError

    with pytest.raises(ConfigError, match=r"dp.physical_batch_size=12 .* device count 8"):
        distributed.physical_batch_size(12, 1000, 0.01, 8)
    assert distributed.physical_batch_size(16, 1000, 0.01, 8) == 16


def test_the_default_physical_size_rounds_up_to_the_device_count():
    from dpjax import distributed
    from dpjax.sampling import default_physical_batch_size

    assert distributed.physical_batch_size(None, 1000, 0.05, 1) == default_physical_batch_size(
        1000, 0.05)
    for n in (3, 8, 16):
        size = distributed.physical_batch_size(None, 1000, 0.05, n)
        assert size % n == 0 and size >= default_physical_batch_size(1000, 0.05)


def test_pad_chunk_adds_masked_rows_only():
    from dpjax import distributed
    from dpjax.sampling import Chunk

    c = distributed.pad_chunk(Chunk(np.arange(5, dtype=np.int32), np.ones(5, np.float32)), 4)
    np.testing.assert_array_equal(c.mask, [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(c.indices[:5], np.arange(5))


def test_one_device_is_the_unsharded_path():
    import jax

    from dpjax import distributed

    assert distributed.make_mesh(jax.devices()[:1]) is None


def test_a_device_count_larger_than_present_is_refused():
    import jax

    from dpjax import distributed
    from dpjax.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.devices='99'"):
        distributed.select_devices("99")
    assert distributed.select_devices("all") == jax.devices()


COMMON = ["dataset=digits", "model=mlp", "model.options.hidden=[16]", "train.batch_size=64",
          "train.steps=6", "train.eval_every=3", "train.log_every=3", "dp.randomness=seeded"]


def _cli(run_dir, *overrides, env):
    return subprocess.Popen([sys.executable, "-m", "dpjax.cli", *COMMON, *overrides,
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=run_dir.parent)


def _finish(procs):
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
    finally:  # a timed-out or failed process must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def one_and_two_devices(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    for n in (1, 2):
        _finish([_cli(root / f"d{n}", env=_env(n))])
    return {n: json.loads((root / f"d{n}" / "summary.json").read_text()) for n in (1, 2)}


def test_training_on_2_devices_from_the_command_line_matches_1_device(one_and_two_devices):
    """The whole loop sharded (placement, eval, checkpoint of sharded arrays): after 6
    steps the summary equals the one-device run's up to float summation order."""
    one, two = one_and_two_devices[1], one_and_two_devices[2]
    assert one["num_devices"] == 1 and two["num_devices"] == 2
    assert two["epsilon"] == one["epsilon"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one_process(one_and_two_devices, tmp_path):
    """``train.distributed=true`` in 2 processes of 1 CPU device each, found through
    Slurm's variables as under ``srun``: each loads its half of every batch, only
    process 0 writes the outputs, and the result is the 2-device run's."""
    run_dir = tmp_path / "run"
    job_id = str(40000 + os.getpid() % 20000)  # JAX derives the coordinator port from it
    procs = []
    for rank in (0, 1):
        env = {**_env(1), "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_STEP_NODELIST": "localhost", "SLURM_NODELIST": "localhost"}
        procs.append(_cli(run_dir, "train.distributed=true", env=env))
    _finish(procs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_devices"] == 2
    assert summary["epsilon"] == one_and_two_devices[2]["epsilon"]
    assert summary["test_loss"] == pytest.approx(one_and_two_devices[2]["test_loss"], rel=1e-5)
    steps = [json.loads(line)["step"] for line in
             (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]
    assert (run_dir / "checkpoints" / "6").is_dir()


if __name__ == "__main__":
    _script()
