"""Grad-CAM and attention-gate maps per hemisphere, mapped back onto the subject's full grid.

Grad-CAM: MONAI's `GradCAM` where it fits (3D models whose chosen layer returns one tensor); the 2D
slice-wise model folds slices into the batch (activations (B*S, C, h, w) against one logit per half), which
MONAI's batch-aligned CAM cannot take, so that path computes the same quantity itself: ReLU of the
activations weighted by their spatially averaged gradients, upsampled per slice. Maps are not normalised
per hemisphere, so the two halves stay comparable on the full grid.

Overlap score: the share of the lesion inside the top 5% most-activated brain voxels, against chance (5%,
what a random 5% of the brain would hold). Its ratio equals the top voxels' lesion share over the lesion's
share of the brain, so "x chance" reads the same either way.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from monai.visualize import GradCAM
from torch import nn

from data_prep.paths import subject_path
from data_prep.store import half_slice, onto_left
from stroke_tss.errors import UserError
from stroke_tss.predict import fold_config, hemisphere_input, load_model
from stroke_tss.tasks import SIDES

DEFAULT_LAYERS = {"slicewise2d": "backbone.layer3", "encoder3d": "down_tr256", "attnvgg3d": "block3"}
METHODS = ("gradcam", "attention")


def _layer(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    name = name or DEFAULT_LAYERS.get(getattr(model, "model_name", ""), "")
    modules = dict(model.named_modules())
    if name not in modules or not name:
        top = [n for n in modules if n and n.count(".") <= 1][:12]
        raise UserError(f"model {getattr(model, 'model_name', '?')} has no layer {name!r}; "
                         f"layers include {', '.join(top)}")
    return name, modules[name]


def _folds_slices(model: nn.Module) -> bool:
    return getattr(model, "model_name", "") == "slicewise2d"


def _resize(maps: torch.Tensor, size: tuple[int, ...]) -> np.ndarray:
    """(N, 1, *spatial) -> numpy (N, *size) by (bi/tri)linear interpolation."""
    mode = "bilinear" if maps.ndim == 4 else "trilinear"
    return F.interpolate(maps.float(), size=size, mode=mode, align_corners=False)[:, 0].detach().numpy()


class _Column(nn.Module):
    """(batch,) logits -> (batch, 1), the class-score layout MONAI's CAMs index into."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, None]


def _own_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        out = output[-1] if isinstance(output, tuple) else output  # Genesis levels return (pooled, skip)
        out.register_hook(lambda g: store.__setitem__("grad", g))
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)  # frozen early blocks still pass gradients to the layer
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    finally:
        handle.remove()
    act, grad = store["act"], store["grad"]
    weights = grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)
    return F.relu((weights * act).sum(1, keepdim=True))


def gradcam(model: nn.Module, x: torch.Tensor, *, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of the positive logit for one hemisphere x (1, C, Z, Y, W) -> (Z, Y, W) float32."""
    name, module = _layer(model, layer)
    model.eval()
    z, y, w = x.shape[2:]
    if _folds_slices(model):
        cam = _own_gradcam(model, module, x)  # (S, 1, h, w)
        return _resize(cam, (y, w)).astype(np.float32)
    probe = {}
    handle = module.register_forward_hook(lambda _m, _i, o: probe.__setitem__("tuple", isinstance(o, tuple)))
    with torch.no_grad():
        model(x)
    handle.remove()
    if probe["tuple"]:
        cam = _own_gradcam(model, module, x)
    else:
        cam = GradCAM(_Column(model), target_layers=f"model.{name}", postprocessing=lambda t: t)(x, class_idx=0)
        return cam[0, 0].detach().numpy().astype(np.float32)
    return _resize(cam, (z, y, w))[0].astype(np.float32)


@torch.no_grad()
def attention_map(model: nn.Module, x: torch.Tensor, *, key: str | None = None) -> np.ndarray:
    """An attention-gate map of one hemisphere on its input grid (Z, Y, W); `key` picks among several."""
    if not hasattr(model, "forward_with_maps"):
        raise UserError(f"model {getattr(model, 'model_name', '?')} has no attention maps")
    model.eval()
    _, maps = model.forward_with_maps(x)
    # the other maps are no attention: per-slice logits, and the segmentation head's lesion logits
    maps = {k: v for k, v in maps.items() if k not in ("slice_logits", "lesion")}
    if not maps:
        raise UserError("this phase ran without its attention gates (phases.NAME.attention: false); "
                        "use --method gradcam, or --phase of a phase trained with them")
    key = key or sorted(maps)[-1]  # the deepest gate by name: gate256, attention3, attention
    if key not in maps:
        raise UserError(f"no attention map {key!r}; this model has {', '.join(sorted(maps))}")
    a = maps[key]
    z, y, w = x.shape[2:]
    if _folds_slices(model):
        return _resize(a[0][:, None], (y, w)).astype(np.float32)  # (S, h, w) per slice
    return _resize(a, (z, y, w))[0].astype(np.float32)


def to_full_grid(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two hemisphere maps (Z, Y, X/2), right flipped as the store reads it, -> (Z, Y, X) un-flipped."""
    return np.concatenate([left, onto_left(right, "right")], axis=-1)


def subject_map(model: nn.Module, store, sid: str, *, method: str = "gradcam", layer: str | None = None,
                channels=None, intensity: str = "zscore") -> np.ndarray:
    """The chosen map for both hemispheres of a subject on the store's full grid (Z, Y, X).

    `channels` and `intensity` must be what the model trained on (the fold's config.yaml).
    """
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    halves = {}
    for side in SIDES:
        x = hemisphere_input(store, sid, side, channels=channels, intensity=intensity)
        halves[side] = gradcam(model, x, layer=layer) if method == "gradcam" else attention_map(model, x, key=layer)
    return to_full_grid(halves["left"], halves["right"])


def overlap_score(heat: np.ndarray, lesion: np.ndarray, brain: np.ndarray, *, top: float = 0.05) -> dict:
    """Share of the lesion in the top `top` most-activated brain voxels, chance, and their ratio."""
    inside = brain > 0
    lesion = (lesion > 0) & inside
    if not lesion.any():
        return {"lesion_in_top": float("nan"), "chance": top, "ratio": float("nan"), "lesion_voxels": 0}
    values = heat[inside]
    # Rank, not threshold: flat maps (e.g. all zeros) would otherwise put the whole brain in the "top".
    order = np.argsort(-values, kind="stable")[: max(1, int(round(top * values.size)))]
    chosen = np.zeros(values.size, bool)
    chosen[order] = True
    share = float(lesion[inside][chosen].sum() / lesion.sum())
    chance = chosen.sum() / values.size
    return {"lesion_in_top": share, "chance": float(chance), "ratio": share / chance,
            "lesion_voxels": int(lesion.sum()), "lesion_share_of_brain": float(lesion.sum() / inside.sum())}


def hemisphere_scores(heat: np.ndarray, lesion: np.ndarray, brain: np.ndarray, *, top: float = 0.05) -> dict:
    """overlap_score within each hemisphere's brain (left = low x), for the halves that hold lesion."""
    parts = {side: np.s_[..., half_slice(heat.shape[-1], side)] for side in SIDES}
    return {side: overlap_score(heat[s], lesion[s], brain[s], top=top)
            for side, s in parts.items() if (lesion[s] > 0).any()}


def save_nifti(volume: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """(Z, Y, X) array -> NIfTI in index order (x, y, z) on the store's affine."""
    path = Path(path)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)).astype(np.float32), affine), path)
    return path


def save_montage(background: np.ndarray, heat: np.ndarray, lesion: np.ndarray | None, path: str | Path, *,
                 num_slices: int = 12, title: str = "") -> Path:
    """Axial slices (through the lesion when there is one) with the map over the MRI and the lesion contour."""
    rows_with_lesion = np.flatnonzero(lesion.reshape(lesion.shape[0], -1).any(1)) if lesion is not None else []
    span = rows_with_lesion if len(rows_with_lesion) else np.flatnonzero(background.reshape(background.shape[0], -1).any(1))
    span = span if len(span) else np.arange(background.shape[0])
    picks = np.unique(np.linspace(span[0], span[-1], min(num_slices, len(span))).round().astype(int))
    cols = min(6, len(picks))
    nrows = int(np.ceil(len(picks) / cols))
    fig = Figure(figsize=(2.2 * cols, 2.4 * nrows))  # no pyplot: no backend, no global figure registry
    axes = fig.subplots(nrows, cols, squeeze=False)
    vmax = float(np.percentile(heat, 99.5)) or 1.0
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), picks):
        # origin lower: anterior up, patient left on the image's left (neurological view)
        ax.imshow(background[z], cmap="gray", origin="lower")
        ax.imshow(heat[z], cmap="jet", alpha=0.4, vmin=0, vmax=vmax, origin="lower")
        if lesion is not None and lesion[z].any():
            ax.contour(lesion[z], levels=[0.5], colors="white", linewidths=0.8, origin="lower")
        ax.set_title(f"z={z}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def explain_subject(weights: str | Path, store, sid: str, *, out_dir: str | Path, method: str = "gradcam",
                    layer: str | None = None, top: float = 0.05) -> dict:
    """Map, NIfTI, montage and overlap scores of one subject for one trained phase (weights.pt)."""
    if sid not in store.subject_ids:
        raise UserError(f"subject {sid!r} is not in store {store.path}; subjects look like {store.subject_ids[:3]}")
    model = load_model(weights)
    cfg = fold_config(Path(weights).parent)
    heat = subject_map(model, store, sid, method=method, layer=layer, channels=(cfg.get("data") or {}).get("channels"),
                       intensity=(cfg.get("train") or {}).get("intensity", "zscore"))
    out = Path(out_dir)
    tail = f"_{method}" + (f"_{layer}" if layer else "")
    nifti, png = subject_path(out, sid, f"{tail}.nii.gz"), subject_path(out, sid, f"{tail}.png")
    out.mkdir(parents=True, exist_ok=True)
    lesion, brain = store.lesion(sid), store.brain(sid)
    background = store.volume(sid)[store.channels.index("dwi") if "dwi" in store.channels else 0]
    result = {"subject_id": sid, "method": method, "layer": layer, "weights": str(weights),
              "nifti": str(save_nifti(heat, store.affine, nifti)),
              "png": str(save_montage(background, heat, lesion, png, title=f"{sid} {method}"))}
    if lesion is not None:
        result["overlap"] = overlap_score(heat, lesion, brain, top=top)
        result["hemispheres"] = hemisphere_scores(heat, lesion, brain, top=top)
    return result
