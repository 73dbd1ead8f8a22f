"""Config loading: YAML + extends + overrides; each mistake is one line naming the key and the file."""

import pytest
import yaml

from stroke_tss.config import Config, dump_config, load_config
from stroke_tss.errors import UserError


@pytest.fixture
def base_yaml(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text("seed: 3\ndata:\n  store: /data/store.zarr\nrun:\n  dir: runs/a\ncv:\n  folds: 4\n")
    return path


def test_loads_file_and_applies_overrides(base_yaml):
    cfg = load_config(base_yaml, ["cv.folds=3", "seed=11", "data.channels=[dwi,flair]"])
    assert isinstance(cfg, Config)
    assert (cfg.seed, cfg.cv.folds, cfg.data.channels) == (11, 3, ["dwi", "flair"])
    assert str(cfg.data.store) == "/data/store.zarr" and str(cfg.run.dir) == "runs/a"


def test_extends_merges_sections_key_by_key(base_yaml, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ncv:\n  kind: loso\n")
    cfg = load_config(child)
    assert (cfg.cv.kind, cfg.cv.folds, cfg.seed) == ("loso", 4, 3)


def test_a_variant_drops_a_phase_with_null_and_keeps_the_rest(tmp_path):
    from stroke_tss.schedule import resolve_variant

    path = tmp_path / "v.yaml"
    path.write_text("data: {store: s.zarr}\nrun: {dir: r}\n"
                    "train: {augment: {gamma: [0.9, 1.1]}}\n"
                    "phases:\n  lesion: {task: lesion_present}\n  tss4h5: {task: tss_lt_4h5, init: lesion}\n"
                    "variants:\n  full: {}\n"
                    "  scratch: {phases: {lesion: null, tss4h5: {init: random}}, train: {augment: {gamma: null}}}\n")
    cfg = load_config(path)
    assert list(resolve_variant(cfg, "full").phases) == ["lesion", "tss4h5"]
    scratch = resolve_variant(cfg, "scratch")
    assert list(scratch.phases) == ["tss4h5"] and scratch.phases["tss4h5"].init == "random"
    assert scratch.train.augment.gamma is None  # null on a value (not a mapping) still sets it


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cv.fodls=3", "unknown config key 'cv.fodls'"),
        ("cv.folds=three", "config key 'cv.folds'"),
        ("cv.kind=random", "config key 'cv.kind'"),
        ("nonsense", "not of the form key.sub=value"),
        ("seed.x=1", "'seed' holds a value"),
    ],
)
def test_bad_overrides_name_the_key_and_file(base_yaml, override, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(base_yaml, [override])
    assert "\n" not in str(err.value)
    if "config key" in message:
        assert str(base_yaml) in str(err.value)


def test_missing_required_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  store: s.zarr\n")
    with pytest.raises(UserError, match="missing required config value 'run'"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(base_yaml, tmp_path):
    cfg = load_config(base_yaml, ["cv.folds=2"])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(out.read_text())["cv"]["folds"] == 2
    assert load_config(out) == cfg
