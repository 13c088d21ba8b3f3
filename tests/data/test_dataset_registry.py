import pytest

import dpjax.data
from dpjax.data import DATASETS, load_dataset, loader_options
from dpjax.data.registry import TEXT_DATASETS


def test_registry_lists_every_dataset():
    assert DATASETS == (
        "digits",
        "mnist1d",
        "synthetic",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "npz",
        "pydoc_text",
        "private_text",
        "text",
    )


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet")
    message = str(error.value)
    assert "name='imagenet'" in message
    for name in DATASETS:
        assert repr(name) in message


def test_unknown_option_names_the_key_value_and_accepted_options():
    with pytest.raises(ValueError) as error:
        load_dataset("synthetic", num_exemples=10)
    message = str(error.value)
    assert "num_exemples=10" in message
    assert "num_train" in message and "separation" in message


@pytest.mark.parametrize(
    "name, option", [("mnist", "data_dir"), ("cifar10", "data_dir"), ("npz", "path")]
)
def test_missing_required_option_is_named(name, option):
    with pytest.raises(ValueError, match=f"Expected option {option} for dataset '{name}'"):
        load_dataset(name)


def test_loader_options_reports_accepted_and_required():
    accepted, required = loader_options("npz")
    assert accepted == ("path", "num_classes", "normalize", "mean", "std", "max_value")
    assert required == ("path",)


def test_every_array_loader_takes_a_normalize_option():
    # The text corpora are bytes: nothing to normalize (their loaders refuse the option).
    for name in DATASETS:
        if name not in TEXT_DATASETS:
            assert "normalize" in loader_options(name)[0]
    assert set(TEXT_DATASETS) <= set(DATASETS)


def test_public_names_are_exported():
    for name in dpjax.data.__all__:
        assert hasattr(dpjax.data, name)


@pytest.mark.parametrize(
    "name, options",
    [
        ("mnist", {"data_dir": "/nonexistent"}),
        ("fashion_mnist", {"data_dir": "/nonexistent"}),
        ("cifar10", {"data_dir": "/nonexistent"}),
        ("npz", {"path": "/nonexistent.npz"}),
        ("digits", {}),
        ("synthetic", {}),
    ],
)
def test_bad_normalize_is_refused_before_any_file_is_read(name, options):
    with pytest.raises(ValueError, match="normalize='zscore' to be one of"):
        load_dataset(name, normalize="zscore", **options)
