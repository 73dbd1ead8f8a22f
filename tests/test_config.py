"""Config loading: YAML + extends + overrides; each mistake is one line naming the key and the file."""

from typing import Any, Literal

import pytest
import yaml

from stroke_tss.config import Config, dump_config, field_type, load_config, parse_override
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
def test_bad_overrides_name_the_key_and_the_override(base_yaml, override, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(base_yaml, [override])
    assert "\n" not in str(err.value)
    if "config key" in message:
        assert str(err.value).startswith(f"override {override}: ") and str(base_yaml) not in str(err.value)


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


def test_override_values_take_the_type_the_schema_gives_the_key(base_yaml):
    cfg = load_config(base_yaml, ["launch.account=12345", "run.name=007", "train.optimizer.lr=1e-3",
                                  "train.stopping.restore_best=false", "train.augment.gamma=[0.9,1e-1]",
                                  "phases.tss3h={task: tss_lt_3h, freeze: [stem,block1]}", "data.store=/x/007"])
    assert cfg.launch.account == "12345" and cfg.run.name == "007"  # str fields keep the text as written
    assert cfg.train.optimizer.lr == 1e-3 and cfg.train.stopping.restore_best is False
    assert cfg.train.augment.gamma == (0.9, 0.1)
    assert cfg.phases["tss3h"].freeze == ["stem", "block1"] and str(cfg.data.store) == "/x/007"


def test_untyped_override_values_resolve_as_json(base_yaml):
    cfg = load_config(base_yaml, ["model.options.dropout=1e-3", "model.options.depth=3",
                                  "model.options.norm=batch", "model.options.tag='12'",
                                  "variants.v={train: {batch_size: 2}, model: {options: {bias: true, scale: null}}}"])
    assert cfg.model.options == {"dropout": 1e-3, "depth": 3, "norm": "batch", "tag": "12"}
    assert isinstance(cfg.model.options["dropout"], float)
    assert cfg.variants["v"] == {"train": {"batch_size": 2}, "model": {"options": {"bias": True, "scale": None}}}
    # a union of scalar types is no single type either: sbatch flags keep their JSON types
    assert parse_override("launch.slurm_extra={exclusive: true, qos: high, nice: 5}")[1] == {
        "exclusive": True, "qos": "high", "nice": 5}


def test_null_override_sets_none_or_removes_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {store: s.zarr}\nrun: {dir: r, name: n}\n"
                    "phases:\n  lesion: {task: lesion_present}\n  tss4h5: {task: tss_lt_4h5}\n")
    cfg = load_config(path, ["run.name=null", "phases.lesion=null"])
    assert cfg.run.name is None and list(cfg.phases) == ["tss4h5"]


def test_field_type_walks_sections_and_dicts_of_sections():
    assert field_type(Config, "train.batch_size") is int
    assert field_type(Config, "phases.tss3h.freeze") == list[str] | Literal["auto"]
    assert field_type(Config, "model.options.dropout") is Any
    assert field_type(Config, "cv.nonsense") is None


def test_errors_name_the_override_or_the_file_they_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {store: s.zarr}\nrun: {dir: r}\ncv: {folds: three}\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["train.batch_size=8"])  # the file's own mistake, an unrelated override
    assert str(err.value).startswith(f"{path}: config key 'cv.folds'")
    with pytest.raises(UserError) as err:
        load_config(path, ["cv.folds=2", "train.batch_size=abc"])
    assert str(err.value).startswith("override train.batch_size=abc: config key 'train.batch_size': Input should "
                                     "be a valid integer")
    with pytest.raises(UserError) as err:  # a check of the whole section the override changed
        load_config(path, ["cv.folds=2", "engine.kind=deepspeed"])
    assert str(err.value).startswith(f"{path} with override engine.kind=deepspeed: config key 'engine'")


@pytest.mark.parametrize("path, transfer, scratch", [
    ("configs/demo.yaml", "2d", "2d_scratch"), ("configs/demo_paper.yaml", "2d", "2d_scratch"),
    ("configs/demo_paper.yaml", "3d", "3d_scratch"), ("configs/tss2d.yaml", "2d", "2d_scratch"),
    ("configs/tss3d.yaml", "3d", "3d_scratch")])
def test_scratch_variants_are_the_papers_random_rows(path, transfer, scratch):
    """Each onset task from random init, nothing frozen, on the transfer variant's network, folds and epochs."""
    from stroke_tss.schedule import resolve_variant

    cfg = load_config(path)
    ours, theirs = resolve_variant(cfg, scratch), resolve_variant(cfg, transfer)
    assert list(ours.phases) == ["tss3h", "tss4h5"]
    for name, phase in ours.phases.items():
        other = theirs.phases[name]
        assert (phase.init, phase.freeze, phase.train_only) == ("random", [], None)
        assert (phase.task, phase.attention) == (other.task, other.attention)
        assert (phase.stopping or ours.train.stopping) == (other.stopping or theirs.train.stopping)
        assert (phase.optimizer or ours.train.optimizer) == (other.optimizer or theirs.train.optimizer)
    assert (ours.model, ours.cv, ours.train, ours.data) == (theirs.model, theirs.cv, theirs.train, theirs.data)


def test_demo_adds_the_attention_gates_in_its_last_phase_only():
    from stroke_tss.schedule import resolve_variant

    cfg = load_config("configs/demo.yaml")
    for variant in ("2d", "3d"):
        phases = resolve_variant(cfg, variant).phases
        assert {name: p.attention for name, p in phases.items()} == {
            "lesion": False, "tss3h": False, "tss4h5": False, "attention": True}
        assert "head" in phases["attention"].train_only  # the gates' head weights start at zero
