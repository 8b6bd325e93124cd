"""Synthetic data: determinism, shared prototypes, posterior validity, ambiguity, Zipf prior, argument checks."""

import numpy as np
import pytest

from avgk.data.synthetic import (
    BLOCK_SIZE,
    class_prototypes,
    generate_synthetic,
    posterior_dense,
    zipf_prior,
)

SMALL = dict(num_classes=10, image_size=16, seed=3)


def _spectrum_features(images_NHWC: np.ndarray) -> np.ndarray:
    """Per-channel |FFT| of [0, 1] images: invariant to the circular shifts the generator applies."""
    images = np.asarray(images_NHWC, dtype=np.float32)
    return (np.abs(np.fft.fft2(images, axes=(1, 2))) / images.shape[1] ** 2).reshape(len(images), -1)


def _nearest_prototype(images_NHWC, prototypes_LHWC):
    feats_N, feats_L = _spectrum_features(images_NHWC / 255.0), _spectrum_features(prototypes_LHWC)
    distances_NL = ((feats_N[:, None, :] - feats_L[None, :, :]) ** 2).sum(-1)
    return distances_NL.argmin(axis=1)


def test_deterministic_by_seed():
    a = generate_synthetic(num_samples=64, **SMALL)
    b = generate_synthetic(num_samples=64, **SMALL)
    for name in ("images_NHWC", "labels_N", "posterior_indices", "posterior_probs", "class_prior_L"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = generate_synthetic(num_samples=64, **{**SMALL, "seed": 4})
    assert not np.array_equal(a.images_NHWC, c.images_NHWC)


def test_splits_differ_but_share_prototypes():
    train = generate_synthetic(num_samples=300, split="train", ambiguity_rate=0.0, **SMALL)
    val = generate_synthetic(num_samples=300, split="val", ambiguity_rate=0.0, **SMALL)
    assert not np.array_equal(train.images_NHWC, val.images_NHWC)
    assert not np.array_equal(train.labels_N, val.labels_N)
    prototypes = class_prototypes(**SMALL)
    for data in (train, val):
        accuracy = (_nearest_prototype(data.images_NHWC, prototypes) == data.labels_N).mean()
        assert accuracy > 0.9, f"nearest-prototype accuracy {accuracy:.3f} on clear images"


def test_prototypes_depend_only_on_seed_classes_size():
    np.testing.assert_array_equal(class_prototypes(**SMALL), class_prototypes(**SMALL))
    assert not np.array_equal(class_prototypes(**SMALL), class_prototypes(**{**SMALL, "seed": 9}))


def test_posterior_rows_are_distributions_containing_the_label():
    data = generate_synthetic(num_samples=500, ambiguity_rate=0.5, **SMALL)
    probs, indices = data.posterior_probs, data.posterior_indices
    assert data.images_NHWC.shape == (500, 16, 16, 3) and data.images_NHWC.dtype == np.uint8
    assert indices.shape == probs.shape == (500, 3)
    assert indices.dtype == np.int64 and probs.dtype == np.float32 and data.labels_N.dtype == np.int64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert ((indices == -1) == (probs == 0)).all(), "padding must be -1 with probability 0"
    assert (indices == data.labels_N[:, None]).any(axis=1).all()
    assert (indices[:, 0] == data.primary_N).all()
    assert (probs[:, 0] >= probs[:, 1]).all() and (probs[:, 1] >= probs[:, 2]).all()
    used = indices >= 0
    assert (indices // BLOCK_SIZE == (data.primary_N // BLOCK_SIZE)[:, None])[used].all()
    for row in indices:
        kept = row[row >= 0]
        assert len(set(kept)) == len(kept)
    dense = data.posterior_NL()
    assert dense.shape == (500, 10)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-6)
    assert (dense[np.arange(500), data.labels_N] > 0).all()


@pytest.mark.parametrize(
    "ambiguity_rate, expect_one_hot",
    [(0.0, True), (1.0, False)],
)
def test_ambiguity_extremes(ambiguity_rate, expect_one_hot):
    data = generate_synthetic(num_samples=300, ambiguity_rate=ambiguity_rate, **SMALL)
    one_hot = data.posterior_probs[:, 0] == 1.0
    assert one_hot.all() == expect_one_hot and (~one_hot).all() == (not expect_one_hot)
    assert (data.is_ambiguous_N == (not expect_one_hot)).all()
    if expect_one_hot:
        assert (data.labels_N == data.primary_N).all()


def test_labels_are_drawn_from_the_mixing_weights():
    data = generate_synthetic(num_samples=20_000, num_classes=10, image_size=8, ambiguity_rate=1.0, seed=1)
    expected = data.posterior_probs[:, 0].mean()
    observed = (data.labels_N == data.primary_N).mean()
    assert abs(observed - expected) < 0.02
    assert 0.3 < observed < 0.9


def test_ambiguous_images_are_not_perfectly_decidable():
    data = generate_synthetic(num_samples=400, ambiguity_rate=0.5, **SMALL)
    predicted = _nearest_prototype(data.images_NHWC, class_prototypes(**SMALL))
    clear, ambiguous = ~data.is_ambiguous_N, data.is_ambiguous_N
    assert (predicted[clear] == data.labels_N[clear]).mean() > 0.9
    assert (predicted[ambiguous] == data.labels_N[ambiguous]).mean() < 0.85


def test_zipf_counts_decrease_and_exponent_zero_is_balanced():
    data = generate_synthetic(num_samples=20_000, num_classes=10, image_size=8, zipf_exponent=1.0)
    counts = np.bincount(data.primary_N, minlength=10)
    assert counts[0] > counts[1] > counts[3] > counts[9]
    np.testing.assert_allclose(counts / counts.sum(), zipf_prior(num_classes=10, zipf_exponent=1.0), atol=0.02)
    balanced = generate_synthetic(num_samples=20_000, num_classes=10, image_size=8, zipf_exponent=0.0)
    counts = np.bincount(balanced.primary_N, minlength=10)
    assert counts.max() / counts.min() < 1.2
    np.testing.assert_allclose(balanced.class_prior_L, 0.1)


def test_last_block_of_one_class_is_always_clear():
    data = generate_synthetic(num_samples=2_000, num_classes=6, image_size=8, ambiguity_rate=1.0, zipf_exponent=0.0)
    alone = data.primary_N == 5
    assert alone.any() and not data.is_ambiguous_N[alone].any()
    assert (data.posterior_indices[~alone] < 5).all()


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"num_classes": 1}, "num_classes.*>= 2.*1"),
        ({"ambiguity_rate": 1.5}, r"ambiguity_rate.*\[0, 1\].*1.5"),
        ({"ambiguity_rate": -0.1}, r"ambiguity_rate.*-0.1"),
        ({"zipf_exponent": -1.0}, "zipf_exponent.*>= 0.*-1.0"),
        ({"image_size": 4}, "image_size.*>= 8.*4"),
        ({"num_samples": 0}, "num_samples.*>= 1.*0"),
        ({"seed": -1}, "seed.*-1"),
        ({"split": ""}, "split"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(overrides, pattern):
    kwargs = dict(num_samples=4, num_classes=10, image_size=8)
    with pytest.raises(ValueError, match=pattern):
        generate_synthetic(**{**kwargs, **overrides})


def test_posterior_dense_scatters_sparse_rows():
    indices = np.array([[2, -1, -1], [0, 1, 4]])
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.3, 0.2]], dtype=np.float32)
    dense = posterior_dense(indices, probs, 5)
    expected = np.array([[0, 0, 1, 0, 0], [0.5, 0.3, 0, 0, 0.2]], dtype=np.float32)
    np.testing.assert_array_equal(dense, expected)
    with pytest.raises(ValueError, match="num_classes=3"):
        posterior_dense(indices, probs, 3)
