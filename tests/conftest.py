"""Shared fixtures: tiny models and batches with fixed seeds; the extended tier."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import DPCNN, MLP
from dpjax.train import cross_entropy_loss

# One persistent XLA compilation cache for the test session, shared by the pytest-xdist
# workers and inherited by the runs tests start as subprocesses: the same small programs
# (the digits MLP's step, its evaluation) compile once instead of in every test. A cached
# executable is the compiled program itself, so no result changes (the golden runs check).
_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# The extended tier: tests that `make test` (CI: 2 cores, 15 minutes for the whole suite)
# leaves to `make test-all`. Each is either a second check of a property a CI test already
# checks on a cheaper path, or a multi-minute end-to-end study. Seconds: measured on the
# 2-core machine under load, 2026-11-29 (about half as much on an idle one).
EXTENDED = {
    # the 8-host-device subprocess (354 s): sharded vmap/fast/conv/SecAgg steps equal the
    # single-device step; CI keeps the 2-device golden run and the 2-device unit tests
    "tests/test_distributed.py::test_the_subprocess_has_8_devices": "8 devices",
    "tests/test_distributed.py::test_sharded_dp_step_equals_the_single_device_step": "8 devices",
    "tests/test_distributed.py::test_sharded_conv_models_equal_the_single_device_step":
        "8 devices",
    "tests/test_distributed.py::test_secagg_on_two_devices_equals_one_device": "8 devices",
    "tests/test_distributed.py::test_the_cases_exercise_padding_and_several_chunks": "8 devices",
    "tests/test_distributed.py::test_training_on_2_devices_from_the_command_line": "2 CLI runs",
    "tests/test_distributed.py::test_two_processes_with_jax_distributed": "2 processes, 35 s",
    "tests/audit/test_step_audit.py::test_the_step_audit_is_consistent_sharp_and_flags_a_broken"
    "_variant[ddgauss]": "25 s: the distributed discrete Gaussian path (Skellam's in CI)",
    "tests/federated/test_user_level_runs.py::test_user_level_distributed_noise_has_the_claimed"
    "_std[ddgauss]": "15 s; Skellam's runs in CI",
    "tests/federated/test_dropout_overflow.py::test_simulated_dropouts_that_leave_too_few_free"
    "_slots_are_refused_or_run": "40 s cold: a run with 3-chunk rounds; the extra dropped "
    "slots are checked in CI by test_user_level_simulated_dropouts_abort_below_min_survivors",
    "tests/federated/test_audit_fedavg.py::test_the_user_level_distributed_noise_audit_is"
    "_consistent_and_flags_weak_party_noise[ddgauss]": "25 s; Skellam's user-level audit in CI",
    "tests/secagg/test_alias.py::test_skellam_float64_pmf_matches_mpmath_at_the_largest_checked"
    "_scale": "60 s of mpmath series at mu = 2e5; CI checks the tables' TV up to mu = 2000",
    "tests/audit/test_step_audit.py::test_the_step_audit_on_two_devices": "75 s",
    "tests/audit/test_one_run.py::test_the_one_run_audit_is_consistent_on_the_correct_mechanism"
    "_over_five_seeds": "5 training runs; CI runs the one-run CLI audit",
    "tests/audit/test_mia.py::test_a_non_private_mlp_on_digits_leaks_membership": "5 models",
    "tests/audit/test_mia.py::test_a_dp_mlp_at_epsilon_1_on_digits_does_not": "5 models",
    "tests/test_checkpoint.py::test_resume_from_a_checkpoint_is_bitwise_and_never_reuses": "62 s",
    "tests/test_resume.py::test_a_two_job_submitit_sweep": "50 s",
    "tests/test_resume.py::test_sigkill_after_a_checkpoint": "44 s",
    "tests/test_resume.py::test_sigterm_saves_at_the_next_step": "21 s",
    "tests/test_models.py::test_every_model_maps_a_batch_to_logits_without_mixing_examples"
    "[wide_resnet]": "55 s",
    "tests/secagg/test_ddp.py::test_decoded_sum_is_the_exact_noisy_integer_sum[2-user-skellam":
        "50 s",
    "tests/secagg/test_ddp.py::test_decoded_sum_is_the_exact_noisy_integer_sum[7-example-ddgauss":
        "48 s",
    "tests/secagg/test_ddp.py::test_decoded_sum_is_the_exact_noisy_integer_sum[100-user-ddgauss":
        "34 s",
    "tests/secagg/test_ddp.py::test_wrap_around_is_handled_modulo_2_to_the_bits": "33 s",
    "tests/test_cli.py::test_target_epsilon_calibrates_sigma": "46 s",
    "tests/test_cli.py::test_a_sweep_with_a_failed_run_and_the_report": "43 s",
    "tests/test_cli.py::test_a_short_run_reports_the_epsilon_of_its_own_fields": "38 s",
    "tests/test_cli.py::test_secagg_aggregation_matches_the_plain_sum_run": "37 s",
    "tests/federated/test_user_level_runs.py::test_user_level_distributed_noise_runs": "40 s",
    "tests/federated/test_user_level_runs.py::test_a_user_level_run_is_accounted_with_the_user"
    "_sampling_rate[aggregation1]": "25 s",
    "tests/test_accounting.py::test_calibration_round_trips[pld]": "21 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[transformer]": "18 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_at_batch_sizes_1_and_257[transformer":
        "16 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_per_layer_bounds": "30 s",
    "tests/test_distributed_dp.py::test_a_distributed_noise_run_reports_its_parameters_and_the"
    "_rdp_epsilon[ddgauss]": "15 s",
    # step audit: CI audits vmap, fast, per-layer and fixed-size (replace-one); SecAgg,
    # microbatch and multi-chunk share their clipped sum or noise with those paths
    "tests/audit/test_step_audit.py::test_the_step_audit_is_consistent_sharp_and_flags_a_broken"
    "_variant[secagg]": "149 s with 2 workers under load",
    "tests/audit/test_step_audit.py::test_the_step_audit_is_consistent_sharp_and_flags_a_broken"
    "_variant[microbatch]": "45 s",
    "tests/audit/test_step_audit.py::test_the_step_audit_is_consistent_sharp_and_flags_a_broken"
    "_variant[multi_chunk]": "43 s",
    "tests/audit/test_exposure.py::test_canary_repeated_16_times_ranks_first": "128 s; CI runs "
    "tests/audit/test_exposure_audit.py's 16-repeat canary through dpjax-audit",
    "tests/secagg/test_ddp_params.py::test_wrap_bound_against_simulation[ddgauss]": "33 s",
    # second cut (the first left `make test` at about 14 minutes on an idle machine);
    # seconds with 2 workers under load
    "tests/audit/test_audit_cli.py::test_a_consistent_audit": "2 CLI audits, 205 s; CI runs "
    "the one-run audit through dpjax-audit",
    "tests/audit/test_audit_cli.py::test_a_refuted_claim": "the same 2 CLI audits",
    "tests/audit/test_audit_cli.py::test_the_report_shows_the_audits": "the same 2 CLI audits",
    "tests/secagg/test_ddp.py::test_aggregator_sees_only_masked_inputs": "134 s",
    "tests/audit/test_step_audit.py::test_the_step_audit_is_consistent_sharp_and_flags_a_broken"
    "_variant[fast]": "43 s; the fast path's sum equals vmap's (tests/test_fast_clipping.py)",
    "tests/audit/test_step_audit.py::test_the_step_audit_is_consistent_sharp_and_flags_a_broken"
    "_variant[per_layer]": "44 s",
    "tests/secagg/test_ddp_params.py::test_wrap_bound_against_simulation": "73 s",
    "tests/federated/test_rounds.py::test_a_secagg_round_with_overflow": "40 s",
    "tests/federated/test_rounds.py::test_dp_fedavg_learns_digits": "31 s",
    "tests/federated/test_audit_fedavg.py::test_the_user_level_audit_is_consistent": "23 s",
    "tests/federated/test_audit_fedavg.py::test_the_user_level_audit_flags_a_broken_variant"
    "[clip]": "22 s",
    "tests/test_aggregation.py::test_a_secagg_step_matches_the_plain_step_within_the"
    "_quantization_bound[settings1]": "21 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[nnx_transformer]": "25 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[dpcnn]": "21 s",
    "tests/test_distributed_dp.py::test_a_target_epsilon_calibrates": "21 s",
    "tests/test_lm_runs.py::test_a_fine_tune_starts_from_its_source": "25 s",
    "tests/test_lm_runs.py::test_fast_clipping_equals_vmap_clipping_on_the_lm": "40 s",
    # fast clipping parity: CI keeps the MLP, NNX CNN, Equinox MLP, tied, scan and feature
    # norm models and every adversarial construction (seconds idle, 2 workers)
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[cnn1d]": "14 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[custom]": "7 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[mixed]": "6 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[ensemble]": "5 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[eqx_cnn]": "8 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_with_mask_nonfinite_rows_and_clipping"
    "[nnx_mlp]": "6 s",
    "tests/test_fast_clipping.py::test_fast_matches_vmap_at_batch_sizes_1_and_257[mlp-257]": "6 s",
    "tests/test_fast_clipping_analysis.py::test_conv_patches_times_the_kernel_reproduce_the"
    "_convolution[case1]": "5 s",
    "tests/test_fast_clipping_analysis.py::test_conv_patches_times_the_kernel_reproduce_the"
    "_convolution[case3]": "6 s",
    "tests/test_fast_clipping_modes.py::test_two_pass_mode_matches_the_reference_with_nonfinite"
    "_rows"
    "[nnx_cnn]": "5 s",
    # benchmark scripts' smoke runs (tests/test_scripts.py), cold compilation cache: CPU
    # seconds (load-independent), then wall seconds on the 2-core machine under load 5-12,
    # 2026-11-30; CI runs audit_sharpness, rdp_compare and bench_exposure (33 CPU s together)
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_clipping]":
        "3 models x 3 frameworks x 4 paths compiled: 23 min wall",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_lm]":
        "6 transformer steps compiled: 112 s wall",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_secagg]":
        "a dozen SecAgg round shapes compiled: 103 s wall",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_step]":
        "the ChaCha20 noise draw and the DP step compiled: 40 CPU s, 166 s wall (10 CPU s warm)",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_scaling]":
        "4 subprocesses on forced host devices: 77 CPU s, 323 s wall",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_audit]":
        "14 step audits, one per mechanism path and its 0.87-sigma variant",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[step_audit_seeds]":
        "a step audit compiled and 3 seeds: about 40 s loaded",
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[ddp_audit_sharpness]":
        "the Skellam step audit compiled and 2 seeds: 13 s loaded (warm cache)",
    "tests/secagg/test_discrete.py::test_low_acceptance_rejection_sampler_leaves_no_coordinate"
    "_unsampled_at_2_to_21": "41 s loaded; CI checks the 8M-draw small-lambda Poisson call",
    # fast_lean (issue 14), cold cache, idle-ish 2026-11-30: CI keeps the Linen and dict MLP
    # parity, per-layer bounds, microbatches, B = 1 / 5, the per-row bound, the fallback
    # report and the lean step's equality with the fast step and its smaller memory
    "tests/test_fast_clipping_lean.py::test_lean_matches_vmap_with_mask_and_nonfinite_rows_at"
    "_odd_batch_size[transformer]": "15 s",
    "tests/test_fast_clipping_lean.py::test_lean_matches_vmap_with_mask_and_nonfinite_rows_at"
    "_odd_batch_size[eqx_cnn]": "6 s",
    # Moved from CI on 2026-11-30 (session 7) to pay for this session's init_from tests,
    # CI having passed in 848 s of 900: cold-cache CPU seconds; each has a CI sibling
    "tests/federated/test_overflow_rounding.py::test_a_round_of_two_chunks_keeps_chunk_zero"
    "_keys_and_an_empty_chunk_adds_nothing": "23 s; CI keeps each unit rounded alone with its "
    "own position key and the paired-axis <= C bound of an overflow round",
    "tests/secagg/test_alias.py::test_second_words_drawn_only_for_tied_blocks_give_the_two"
    "_word_draws": "14 s; CI keeps the table's exactness and its draws under jit and vmap",
    "tests/test_clipping.py::test_per_example_grads_equal_a_loop_of_single_example_grads"
    "[cnn_problem]": "12 s; CI keeps the MLP, and fast-vs-vmap parity on CNNs",
    "tests/test_transformer.py::test_position_t_does_not_see_later_tokens[rotary]":
        "14 s; CI keeps learned positions (the causal mask is the same)",
    # and, after a cold idle run of the suite at 758 s (19:19-19:31; 699 s at 16:5x), five
    # more with siblings in CI (cold CPU seconds):
    "tests/test_scripts.py::test_the_script_runs_in_its_smallest_mode[bench_exposure]":
        "15 s; CI keeps the trie scorer's equality with brute force (tests/audit)",
    "tests/test_golden_runs.py::test_a_two_device_seeded_run_is_bit_identical_to_its_golden":
        "16 s; CI keeps the one-device golden runs of every mechanism path",
    "tests/test_fast_clipping.py::test_every_framework_finds_its_layers": "14 s; CI keeps "
    "fast-vs-vmap parity on Linen, NNX, Equinox and dict models",
    "tests/test_train_step.py::test_dp_training_reduces_the_loss": "11 s; CI keeps the "
    "golden runs (bit-exact seeded trajectories)",
    "tests/test_distributed_dp.py::test_a_distributed_noise_run_reports_its_parameters_and_the"
    "_rdp_epsilon[skellam]": "14 s; CI keeps the ddgauss run of the same test",
    # model.init_from (issue 15 review, 2026-11-30): three tiny runs and two resumes; CI
    # keeps the chain, content and check_source tests (the privacy rules)
    "tests/test_lm_runs.py::test_resuming_after_the_source_has_changed_is_refused":
        "3 tiny runs, 2 resumes: 29 s loaded",
    "tests/test_fast_clipping_lean.py::test_lean_dp_step_memory_is_within_1_2x_of_the_non_private"
    "_step": "9 s each (Linen, Equinox): the issue's target at MLP B = 1024, printed by "
    "bench_clipping.py too",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.nodeid.startswith(prefix) for prefix in EXTENDED):
            item.add_marker(pytest.mark.extended)


def _problem(model, input_shape, batch_size, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch_size, *input_shape), jnp.float32)
    y = jnp.asarray(rng.randint(0, 10, batch_size), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), x[:1])["params"]
    return cross_entropy_loss(model.apply), params, (x, y)


@pytest.fixture
def mlp_problem():
    """A small MLP on 6x6x1 inputs, batch 12."""
    return _problem(MLP(num_classes=10, hidden=(16, 8)), (6, 6, 1), 12)


@pytest.fixture
def cnn_problem():
    """The DP CNN on 16x16x1 inputs, batch 8."""
    return _problem(DPCNN(num_classes=10), (16, 16, 1), 8)


@pytest.fixture
def break_mechanism(monkeypatch):
    """``break_mechanism(how)`` breaks the library for the rest of the test, as the audits'
    broken variants do: ``"noise"`` divides every noise multiplier by 4
    (``noise.privatize``), ``"party_noise"`` divides the standard deviation of every
    distributed-DP party's discrete noise by 4 (``ddp.party_noise``), ``"clip"`` makes
    clipping not clip (``clip_math.clip_factors`` is 1 on every live row; NaN norms stay
    NaN). An audit must flag each."""
    import dataclasses  # noqa: PLC0415

    from dpjax import clip_math, noise  # noqa: PLC0415
    from dpjax.secagg import ddp  # noqa: PLC0415

    def apply(how: str) -> None:
        if how == "party_noise":
            real_party = ddp.party_noise
            monkeypatch.setattr(ddp, "party_noise", lambda key, params: real_party(
                key, dataclasses.replace(params,
                                         party_noise_variance=params.party_noise_variance / 16)))
        elif how == "noise":
            real = noise.privatize
            monkeypatch.setattr(noise, "privatize", lambda s, k, **kw: real(
                s, k, **{**kw, "noise_multiplier": kw["noise_multiplier"] / 4}))
        elif how == "clip":
            monkeypatch.setattr(clip_math, "clip_factors",
                                lambda norms, mask, c: mask * (norms == norms))
        else:
            raise ValueError(f"Expected how={how!r} to be 'noise', 'party_noise' or 'clip'.")

    return apply
