"""Intensity normalisation needs no lesion mask (inputs never depend on labels, and `predict` normalises a new
subject as the store did), yet keeps the lesion contrast the old mask-based statistics kept: measured on
phantom subjects and on the ISLES'22 case through the pipeline's own `normalize_channel`."""

from pathlib import Path

import numpy as np
import pytest

from data_prep import preprocess as pp
from data_prep.build import subject_dict
from data_prep.cohort import read_manifest
from data_prep.config import PrepConfig
from data_prep.pipeline import normalize_channel, preprocess_subject, statistics_region
from tests.fixtures.data import tiny_prep_config

# A store built before `robust` existed (the tiny store's attrs of that time): its config and hash must still
# read, or `prep` could neither extend it nor `predict` prep new subjects like it.
OLD_STORE_CONFIG = {
    "channels": ["dwi", "b0", "flair"], "spacing_mm": 4.0, "shape": [40, 48, 40], "center_mm": [-18.0, 18.0],
    "n4": True, "n4_spacing_mm": 8.0, "n4_iterations": [10, 10], "skull_strip": "auto", "registration": "affine",
    "coregistration": "auto", "registration_seed": 0, "sampling_fraction": 0.1, "zscore": True,
    "normalize_on": "normal_tissue", "histogram_match": True, "reference_subject": None,
    "histogram_landmarks": 101, "histogram_percentiles": [1.0, 99.0], "ct_window": {}, "dtype": "float32",
    "codec": "zstd", "codec_level": 1, "chunk_zyx": None, "qc_montage": False}
OLD_STORE_HASH = "ccb83e04003e2c22"


def test_a_store_built_with_the_mask_based_normalisation_keeps_its_config_and_hash() -> None:
    config = PrepConfig.model_validate(OLD_STORE_CONFIG)
    assert config.normalize_on == "normal_tissue" and config.config_hash() == OLD_STORE_HASH
    assert PrepConfig().normalize_on == "robust"


def _rows(manifest: Path, config: PrepConfig) -> list[dict]:
    return [subject_dict(r, config.channels) for r in read_manifest(manifest, channels=config.channels).rows]


@pytest.mark.integration  # two runs of the chain on one 4 mm phantom subject
def test_a_subject_normalises_identically_with_and_without_its_lesion_mask(tiny_cohort: Path) -> None:
    config = tiny_prep_config()
    row = next(r for r in _rows(tiny_cohort, config) if r.get("lesion_mask"))
    unmasked = {k: v for k, v in row.items() if k != "lesion_mask"}
    reference = {"channels": {c: np.linspace(-2.0, 4.0, config.histogram_landmarks).tolist()
                              for c in config.channels}}
    with_mask = preprocess_subject(row, config=config, reference=reference)
    without = preprocess_subject(unmasked, config=config, reference=reference)
    assert with_mask.lesion is not None and with_mask.lesion.any() and without.lesion is None
    np.testing.assert_array_equal(with_mask.volume, without.volume)
    assert with_mask.landmarks == without.landmarks


def _contrast(volume: np.ndarray, brain: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Per channel: (mean over the lesion - median of normal tissue) / IQR of normal tissue."""
    normal = pp.normal_tissue(brain, lesion) > 0
    out = []
    for channel in volume:
        q1, median, q3 = np.percentile(channel[normal], (25, 50, 75))
        out.append((channel[lesion > 0].mean() - median) / (q3 - q1))
    return np.array(out)


def _normalised(raw, config: PrepConfig, reference: dict | None) -> tuple[np.ndarray, dict]:
    """A subject's un-normalised volumes through the pipeline's normalisation under `config`."""
    region = statistics_region(raw.brain, raw.lesion, config=config)
    pairs = [normalize_channel(raw.volume[i], raw.brain, region, name=name, config=config, reference=reference)
             for i, name in enumerate(config.channels)]
    return np.stack([v for v, _ in pairs]), {"channels": {n: m for n, (_, m) in zip(config.channels, pairs)}}


def _contrasts(raws: list, reference_raw, config: PrepConfig) -> np.ndarray:
    """(subjects, channels) lesion contrast, each subject matched to `reference_raw`'s landmarks."""
    reference = _normalised(reference_raw, config, None)[1]
    return np.array([_contrast(_normalised(raw, config, reference)[0], raw.brain, raw.lesion) for raw in raws])


BASE = tiny_prep_config()
ROBUST = BASE.model_copy(update={"normalize_on": "robust"})
MASK_BASED = BASE.model_copy(update={"normalize_on": "normal_tissue", "histogram_percentiles": (1.0, 99.0)})


@pytest.fixture(scope="module")
def raw_phantom(tiny_cohort: Path) -> list:
    """The tiny cohort's subjects preprocessed up to, not including, normalisation."""
    config = BASE.model_copy(update={"zscore": False})
    return [preprocess_subject(row, config=config) for row in _rows(tiny_cohort, config)]


@pytest.mark.integration  # the chain without normalisation on 8 phantom subjects (~25 s)
def test_mask_free_normalisation_keeps_the_mask_based_lesion_contrast_on_phantom_subjects(raw_phantom) -> None:
    with_lesion = [raw for raw in raw_phantom if raw.lesion is not None and raw.lesion.sum() >= 2]
    assert len(with_lesion) >= 5
    robust, old = (_contrasts(with_lesion, raw_phantom[0], c) for c in (ROBUST, MASK_BASED))
    ratio = robust.mean(0) / old.mean(0)  # dwi, b0, flair
    # measured on this cohort (seed 7, 8 subjects, lesions of 4-998 voxels): 1.045, 0.977, 1.082. The margin
    # of 0.05 below each covers registration landing a voxel apart on another SimpleITK build. Mask-free
    # landmarks up to the brain's 99th percentile drop FLAIR to 0.86 here, and DWI and FLAIR to 0.87 and 0.91
    # on a 100-subject seed-0 cohort (robust up to the 80th: 0.970 and 0.965; the true-mask FLAIR readout of
    # tss_lt_4h5 there: AUC 0.773 robust, 0.757 mask-based, 0.741 mask-free up to the 99th)
    assert (ratio >= [0.99, 0.92, 1.03]).all(), ratio


@pytest.mark.integration  # the ISLES'22 case through the chain (~10 s) besides the phantom subjects
def test_mask_free_normalisation_keeps_the_mask_based_lesion_contrast_on_the_isles_case(isles: Path,
                                                                                        raw_phantom) -> None:
    """Matched to a phantom subject's histogram, as `predict` preps a real scan for a phantom-trained run."""
    from data_prep.cohort_scan import scan_tree

    config = BASE.model_copy(update={"zscore": False})
    row = scan_tree(isles).iloc[0].to_dict()
    raw = preprocess_subject({k: v for k, v in row.items() if isinstance(v, str)}, config=config)
    assert raw.lesion is not None and raw.lesion.sum() >= 10
    robust, old = (_contrasts([raw], raw_phantom[0], c)[0] for c in (ROBUST, MASK_BASED))
    # measured: dwi 2.61 vs 1.53, b0 0.32 vs 0.30, flair 0.50 vs 0.40 (ratios 1.71, 1.06, 1.26); the margin
    # of 0.05 as above. Mask-free landmarks up to the 99th percentile give 1.25, 1.01, 1.00
    assert (robust / old >= [1.65, 1.01, 1.21]).all(), (robust, old)
