"""The attention gates per phase (phases.NAME.attention): off, they add nothing and learn nothing; weights made
without them predict the same after a reload; a phase that adds them starts from the earlier phase's logits."""

from __future__ import annotations

import pytest
import torch

from stroke_tss.cli import main as cli_main
from stroke_tss.config import load_config
from stroke_tss.errors import UserError
from stroke_tss.models import build_model, freeze
from stroke_tss.models.gates import open_gates
from stroke_tss.predict import load_model
from stroke_tss.schedule import phase_model, resolve_variant
from stroke_tss.weights import save_weights

GATED = {"slicewise2d": ({"num_slices": 3, "base_channels": 4}, (3, 3, 40, 32)),
         "encoder3d": ({"base_channels": 4}, (3, 16, 24, 32))}
GATE_MODULES = {"slicewise2d": ("gate",), "encoder3d": ("gate128", "gate256")}

pytestmark = pytest.mark.usefixtures("one_thread")


def _built(name: str, **extra):
    torch.manual_seed(0)
    options, shape = GATED[name]
    return build_model(name, **options, **extra), torch.rand(2, *shape)


@pytest.mark.parametrize("name", GATED)
def test_gates_off_add_nothing_to_the_logit_and_get_no_gradient(name):
    model, x = _built(name, attention=False)
    freeze(model, [])  # a phase that freezes nothing still holds the unused gates fixed
    gate_params = [p for m in GATE_MODULES[name] for p in getattr(model, m).parameters()]
    assert gate_params and not any(p.requires_grad for p in gate_params)
    model.eval()
    before = model(x).detach()
    with torch.no_grad():
        for p in gate_params:
            p.add_(torch.randn_like(p))
        model.classifier.weight[:, model.gated_columns] += 1.0
    assert torch.equal(model(x).detach(), before)  # neither the gates nor their head columns reach the logit
    model.train()
    model(x).sum().backward()
    assert all(p.grad is None for p in gate_params)
    assert model.classifier.weight.grad[:, model.gated_columns].abs().max() == 0
    _, maps = model.forward_with_maps(x)
    assert not set(maps) & {"attention", "gate128", "gate256"}


@pytest.mark.parametrize("name", GATED)
def test_weights_made_without_gates_rebuild_without_them_and_predict_the_same(name, tmp_path):
    model, x = _built(name, attention=False)
    model.eval()
    path = save_weights(tmp_path / "weights.pt", model, model.state_dict())
    reloaded = load_model(path)
    assert reloaded.init_args["attention"] is False
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


@pytest.mark.parametrize("name", GATED)
def test_adding_the_gates_starts_from_the_gateless_logits_and_then_they_learn(name):
    without, x = _built(name, attention=False)
    with torch.no_grad():  # as after training: head weights everywhere non-zero
        without.classifier.weight.normal_()
    without.eval()
    with_gates, _ = _built(name)
    with_gates.load_state_dict(without.state_dict())
    with_gates.eval()
    with torch.no_grad():
        assert not torch.allclose(with_gates(x), without(x))  # untrained head columns would shift the logits
    open_gates(with_gates)
    with torch.no_grad():
        assert torch.allclose(with_gates(x), without(x), atol=1e-6)
    with_gates.train()
    with_gates(x).sum().backward()
    assert with_gates.classifier.weight.grad[:, with_gates.gated_columns].abs().max() > 0


# demo.yaml at the smallest size: narrow, one epoch per phase, 2 folds
SMALL = ["cv.folds=2", "model.options.base_channels=4", "train.stopping.max_epochs=1", "train.stopping.min_epochs=1",
         "phases.lesion.stopping=null"]


def test_demo_schedule_trains_without_gates_then_adds_them_from_tss4h5s_predictions(tmp_path):
    """One fold of demo.yaml's 2d and 2d_scratch: the paper's attention schedule and the Random row, end to end."""
    from data_prep.store import open_store
    from tests.test_data import make_store

    store, run = make_store(tmp_path / "store.zarr", num_subjects=16), tmp_path / "run"
    where = [f"data.store={store}", f"run.dir={run}", *SMALL]
    assert cli_main(["train", "configs/demo.yaml", "--fold", "0", "--variant", "2d", "--variant", "2d_scratch",
                     *where]) == 0
    fold = run / "2d" / "fold-0"
    made_with = {p: load_model(fold / p / "weights.pt").init_args["attention"]
                 for p in ("lesion", "tss3h", "tss4h5", "attention")}
    assert made_with == {"lesion": False, "tss3h": False, "tss4h5": False, "attention": True}
    scratch = sorted(p.name for p in (run / "2d_scratch" / "fold-0").iterdir() if p.is_dir())
    assert scratch == ["tss3h", "tss4h5"]

    # the attention phase's model, as the schedule builds it, predicts exactly what tss4h5 saved
    vcfg = resolve_variant(load_config("configs/demo.yaml", where), "2d")
    dirs = {p: fold / p for p in ("lesion", "tss3h", "tss4h5")}
    added = phase_model(vcfg, vcfg.phases["attention"], open_store(store), phase_dirs=dirs, run_dir=run,
                        fold=0).eval()
    x = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(added(x), load_model(fold / "tss4h5" / "weights.pt")(x), atol=1e-5)
    assert added.classifier.weight.requires_grad and not added.backbone.conv1.weight.requires_grad

    frozen_head = vcfg.phases["attention"].model_copy(update={"train_only": ["attention", "slice_weights"]})
    with pytest.raises(UserError, match="add head to its train_only"):
        phase_model(vcfg, frozen_head, open_store(store), phase_dirs=dirs, run_dir=run, fold=0)


def test_attention_false_on_a_model_without_gates_is_one_clear_line(tmp_path, capsys):
    from data_prep.store import open_store
    from tests.test_data import make_store

    store = make_store(tmp_path / "store.zarr", num_subjects=8)
    cfg = load_config("configs/outcome3d.yaml", [f"data.store={store}", f"run.dir={tmp_path / 'run'}"])
    phase = next(iter(cfg.phases.values())).model_copy(update={"attention": False, "init": "random"})
    with pytest.raises(UserError, match="has no attention gates to switch off"):
        phase_model(cfg, phase, open_store(store), phase_dirs={}, run_dir=tmp_path / "run", fold=0)
    # the line names the phase (not its task), and through train the variant too
    off = load_config("configs/outcome3d.yaml", [f"data.store={store}", f"run.dir={tmp_path / 'run'}",
                                                 "phases.outcome.attention=false"])
    with pytest.raises(UserError, match=r"^phase outcome \(init random\): attention: false"):
        phase_model(off, off.phases["outcome"], open_store(store), phase_dirs={}, run_dir=tmp_path / "run", fold=0)
    assert cli_main(["train", "configs/outcome3d.yaml", "--fold", "0", "--variant", "light0", f"data.store={store}",
                     f"run.dir={tmp_path / 'run'}", "phases.outcome.attention=false", "train.num_workers=0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("stroke-tss train: error: variant light0, phase outcome (init random): attention: false")


def test_a_seg_head_trains_only_in_a_mask_phase(tmp_path):
    """A model with a segmentation head under avg/max pooling: the head gets a gradient only from a mask task's
    loss, so every other phase holds it fixed (else DDP with find_unused_parameters=False waits for it),
    whether the phase names freeze groups or train_only ones, while a lesion_seg phase trains it."""
    from data_prep.store import open_store
    from tests.test_data import make_store

    store = open_store(make_store(tmp_path / "store.zarr", num_subjects=8))
    cfg = resolve_variant(load_config("configs/demo.yaml", [f"data.store={store.path}", f"run.dir={tmp_path / 'run'}",
                                                           "model.options.seg_head=true"]), "2d")
    random = {"init": "random", "reinit": []}
    phases = {"tss3h": cfg.phases["tss3h"].model_copy(update=random),
              "attention": cfg.phases["attention"].model_copy(update={**random, "train_only": [
                  "attention", "slice_weights", "head", "seg_head"]}),
              "seg": cfg.phases["lesion"].model_copy(update={"task": "lesion_seg"})}
    trains = {}
    for name, phase in phases.items():
        model = phase_model(cfg, phase, store, phase_dirs={}, run_dir=tmp_path / "run", fold=0)
        assert model.init_args["pool"] == "max" and model.classifier.weight.requires_grad
        trains[name] = {p.requires_grad for p in model.seg_head.parameters()}
    assert trains == {"tss3h": {False}, "attention": {False}, "seg": {True}}
