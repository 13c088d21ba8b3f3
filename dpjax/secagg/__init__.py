"""Secure aggregation as ``jnp`` operations: the aggregator learns a sum and nothing else.

Modules, bottom up:

- ``chacha``:     ChaCha20 block function and keystream (RFC 8439), pure jnp.
- ``randomness``: secure vs simulation randomness, nonces for domain separation.
- ``encoding``:   fixed-point floats <-> Z_2^32 with stochastic rounding, wrap guard.
- ``sharing``:    additive n-of-n shares over Z_2^32.
- ``shamir``:     t-of-n Shamir shares over GF(2^61 - 1) (host side).
- ``graph``:      complete (SecAgg) and random k-regular (SecAgg+) neighbour graphs.
- ``keys``:       pairwise seeds by X25519 + HKDF, or a trusted dealer.
- ``protocol``:   the SecAgg rounds, one function per role.
- ``aggregate``:  ``prepare_round`` + jittable ``secure_sum``.

Distributed DP (parties add discrete noise before masking; docs/secagg.md):

- ``discrete``:   discrete Gaussian / Skellam samplers (exact-in-design rejection).
- ``rotation``:   randomized Hadamard / DFT rotation shared by a round's parties.
- ``rounding``:   randomized and conditional (norm-bounded) rounding.
- ``modular``:    integers mod 2^bits, SecAgg over Z_{2^bits} (``secure_sum_mod``).
- ``wrap``:       bound on the probability that the decoded sum wraps.
- ``ddp_params``: ``choose_parameters`` -> ``DDPParams`` (gamma, noise, sensitivities).
- ``ddp``:        the per-party pipeline, decoding, and ``ddp_secure_sum``.

Trust model and what the aggregator learns: see ``protocol`` and docs/secagg.md.
"""

from dpjax.secagg.aggregate import RoundMasks, prepare_round, secure_sum
from dpjax.secagg.chacha import (
    bytes_to_words,
    chacha20_block,
    chacha20_stream,
    weighted_stream_sum,
    words_to_bytes,
)
from dpjax.secagg.ddp import ddp_secure_sum, decode_sum, party_encode
from dpjax.secagg.ddp_params import DDPParams, Noise, Unit, choose_parameters
from dpjax.secagg.discrete import discrete_gaussian, skellam
from dpjax.secagg.encoding import check_no_wrap, decode, encode, quantization_error_bound
from dpjax.secagg.graph import complete_graph, harary_graph, random_regular_graph
from dpjax.secagg.keys import KeyAgreement
from dpjax.secagg.modular import secure_sum_mod
from dpjax.secagg.randomness import Mode, Purpose, fresh_seed, simulation_seed
from dpjax.secagg.rotation import Rotation
from dpjax.secagg.shamir import MERSENNE_61, shamir_evaluate, shamir_reconstruct, shamir_share
from dpjax.secagg.sharing import reconstruct, share

__all__ = [
    "DDPParams",
    "MERSENNE_61",
    "KeyAgreement",
    "Mode",
    "Noise",
    "Purpose",
    "Rotation",
    "RoundMasks",
    "Unit",
    "bytes_to_words",
    "chacha20_block",
    "chacha20_stream",
    "check_no_wrap",
    "choose_parameters",
    "complete_graph",
    "ddp_secure_sum",
    "decode",
    "decode_sum",
    "discrete_gaussian",
    "encode",
    "fresh_seed",
    "harary_graph",
    "party_encode",
    "prepare_round",
    "quantization_error_bound",
    "random_regular_graph",
    "reconstruct",
    "secure_sum",
    "secure_sum_mod",
    "shamir_evaluate",
    "shamir_reconstruct",
    "shamir_share",
    "share",
    "simulation_seed",
    "skellam",
    "weighted_stream_sum",
    "words_to_bytes",
]
