"""User partitions: every example assigned once, label skew as documented, seeded, and the
natural partition of an npz file."""

import numpy as np
import pytest

from dpjax.data import load_digits
from dpjax.federated.users import (
    PartitionKind,
    UserPartition,
    iid_partition,
    label_skew_partition,
    load_npz_user_ids,
    natural_partition,
    shards_per_class,
)


def _mnist1d_like_labels(seed=0):
    """60,000 labels of 10 classes of unequal sizes (MNIST-1D's training split is a random
    60,000 of 7,000 per class), shuffled."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(10), 7000))[:60_000].astype(np.int32)


def _histograms(user_ids, labels, num_users, num_classes):
    """Label counts per user, by a Python loop (the reference)."""
    h = np.zeros((num_users, num_classes), np.int64)
    for u, c in zip(user_ids.tolist(), labels.tolist(), strict=True):
        h[u, c] += 1
    return h


def test_label_skew_gives_600_users_of_two_classes_each_and_every_example_once():
    y = _mnist1d_like_labels()
    p = label_skew_partition(y, 600, seed=0)
    assert p.num_users == 600 and p.kind is PartitionKind.LABEL_SKEW
    # every example exactly once: the users' example lists are a permutation of 0..N-1
    listed = np.concatenate([p.examples(u) for u in range(600)])
    assert np.array_equal(np.sort(listed), np.arange(60_000))
    h = _histograms(p.user_ids, y, 600, 10)
    assert h.sum() == 60_000
    assert ((h > 0).sum(axis=1) <= 2).all()  # at most two classes per user, exactly
    assert (h > 0).sum(axis=1).mean() > 1.8  # most users hold two (one: both shards alike)
    # shards of about N / (2U) = 50 examples: user sizes near 100
    assert 96 <= p.sizes.min() and p.sizes.max() <= 104
    # class sizes are kept: every class is spread over users in proportion to its size
    assert np.array_equal(h.sum(axis=0), np.bincount(y, minlength=10))


def test_iid_users_see_almost_every_class_and_label_skew_users_do_not():
    y = _mnist1d_like_labels()
    iid = _histograms(iid_partition(60_000, 600, seed=0).user_ids, y, 600, 10)
    skew = _histograms(label_skew_partition(y, 600, seed=0).user_ids, y, 600, 10)
    top2_iid = np.sort(iid, axis=1)[:, -2:].sum(axis=1) / iid.sum(axis=1)
    top2_skew = np.sort(skew, axis=1)[:, -2:].sum(axis=1) / skew.sum(axis=1)
    assert top2_skew.min() == 1.0
    assert top2_iid.mean() < 0.35  # ~ 0.2 + the spread of 100 draws
    assert (iid > 0).sum(axis=1).mean() > 9.5
    assert set(np.bincount(iid_partition(60_000, 600, seed=0).user_ids)) == {100}


def test_partitions_are_seeded_and_depend_on_the_labels_only():
    y = _mnist1d_like_labels()
    a = label_skew_partition(y, 600, seed=3).user_ids
    assert np.array_equal(a, label_skew_partition(y.copy(), 600, seed=3).user_ids)
    assert not np.array_equal(a, label_skew_partition(y, 600, seed=4).user_ids)
    b = iid_partition(60_000, 600, seed=3).user_ids
    assert np.array_equal(b, iid_partition(60_000, 600, seed=3).user_ids)
    assert not np.array_equal(b, iid_partition(60_000, 600, seed=4).user_ids)


def test_digits_training_split_into_100_label_skew_users():
    ds = load_digits()
    p = label_skew_partition(ds.y_train, 100, seed=0)
    h = _histograms(p.user_ids, ds.y_train, 100, 10)
    assert ((h > 0).sum(axis=1) <= 2).all() and h.sum() == ds.num_train
    assert p.sizes.min() >= 1


def test_shards_per_class_is_proportional_at_least_one_and_sums_to_the_total():
    k = shards_per_class(np.array([50, 3, 1, 946]), 20)
    assert k.sum() == 20 and (k >= 1).all() and (k <= [50, 3, 1, 946]).all()
    assert k[3] >= 17  # 946 / 1000 of 20 shards
    assert list(shards_per_class(np.array([5, 5]), 10)) == [5, 5]
    with pytest.raises(ValueError, match="between the number of classes"):
        shards_per_class(np.array([5, 5, 5]), 2)


def test_label_skew_refuses_more_shards_than_examples_or_fewer_than_classes():
    y = np.arange(10) % 5
    with pytest.raises(ValueError, match="num_users=6"):
        label_skew_partition(y, 6, seed=0)
    with pytest.raises(ValueError, match="num_users=2"):
        label_skew_partition(y, 2, seed=0, classes_per_user=2)
    with pytest.raises(ValueError, match="seed=-1"):
        label_skew_partition(y, 2, seed=-1, classes_per_user=3)


def test_natural_partition_from_an_npz_file_renumbers_ids_densely(tmp_path):
    ids = np.array([70, 3, 3, 9, 70, 70, 9, 3], np.int64)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((8, 2), np.float32), y_train=np.zeros(8, np.int32),
             x_test=np.zeros((1, 2), np.float32), y_test=np.zeros(1, np.int32), user_train=ids)
    p = natural_partition(load_npz_user_ids(path, 8))
    assert p.kind is PartitionKind.NATURAL and p.num_users == 3
    assert list(p.user_ids) == [2, 0, 0, 1, 2, 2, 1, 0]  # ids 3, 9, 70 -> 0, 1, 2
    assert [list(p.examples(u)) for u in range(3)] == [[1, 2, 7], [3, 6], [0, 4, 5]]
    with pytest.raises(ValueError, match="one integer per training example"):
        load_npz_user_ids(path, 9)
    np.savez(tmp_path / "no_users.npz", x_train=np.zeros((8, 2), np.float32))
    with pytest.raises(ValueError, match="no array 'user_train'"):
        load_npz_user_ids(tmp_path / "no_users.npz", 8)
    with pytest.raises(ValueError, match="1-D integer"):
        natural_partition(np.array([0.5, 1.0]))


def test_a_partition_refuses_users_without_examples_and_ids_out_of_range():
    with pytest.raises(ValueError, match="1 hold none"):
        UserPartition(np.array([0, 0, 2]), 3, "iid")
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        UserPartition(np.array([0, 2]), 2, "iid")
