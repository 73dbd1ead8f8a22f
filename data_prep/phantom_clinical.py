"""The phantom's latent clinical model: onset time, lesion signal over time, sites, outcome, readers.

Signal physics (what the images are rendered from):
- DWI: cytotoxic oedema restricts diffusion within minutes, so the lesion's ADC drops to `adc_ratio`
  (0.45-0.65 of normal) from the first scan on and stays low over the window modelled here; the DWI lesion
  is bright from the start (low ADC, plus T2 shine-through later).
- FLAIR and b0/T2: vasogenic oedema builds up over hours. The lesion's relative signal is
  1 + v(t), v(t) = A (1 - exp(-t / tau)), with a per-patient amplitude A and rate 1/tau (collaterals,
  reperfusion and lesion age vary between patients), and 1 + T2_SHARE v(t) on b0. Because A and tau vary,
  the same v is reached at different times: a classifier can only partly separate < 4.5 h from later.
- Onset-to-MRI time: a split log-normal with median 222 min and quartiles 105 / 715 min (the shape of
  published acute-stroke cohorts), clipped to 20 min - 7 days; about 25% of onsets are unknown (wake-up
  strokes) and are written as empty cells, though their true time is kept in truth.csv.

The oracle (`oracle_aucs`) is the Bayes AUC per task from the latent values, by Monte Carlo: the AUC of
the posterior P(label | latent), estimated on 200,000 draws of this model, independent of the cohort.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ONSET_MEDIAN_MIN = 222.0
ONSET_SIGMA_LOW = float(np.log(222 / 105) / 0.6745)  # below the median: hits the first quartile at 105
ONSET_SIGMA_HIGH = float(np.log(715 / 222) / 0.6745)  # above: hits the third quartile at 715
ONSET_RANGE_MIN = (20.0, 7 * 24 * 60.0)
UNKNOWN_ONSET_SHARE = 0.25
NO_LESION_SHARE = 0.12  # subjects without an infarct (mimics, TIA): subject-level negatives
BILATERAL_SHARE = 0.06  # of the stroke subjects
FLAIR_A_MEDIAN, FLAIR_A_SIGMA = 0.6, 0.35
TAU_MEDIAN_MIN, TAU_SIGMA = 480.0, 1.05
T2_SHARE = 0.5  # b0/T2 rises by half of FLAIR's relative change (same oedema, weaker contrast)
READER_NOISE = 0.06
READER_THRESHOLDS = (0.12, 0.15, 0.18)  # the relative FLAIR signal each reader calls "visible"


@dataclass(frozen=True)
class Site:
    name: str
    share: float
    scale: float  # receiver gain: intensity of CSF on b0
    noise: float  # Rician sigma as a fraction of `scale`
    voxel: tuple[float, float, float]  # voxel size as multiples of the cohort spacing
    flip_x: bool  # stored LAS (x index runs right -> left), as many scanners write it


SITES = (
    Site("site-A", 0.35, 1000.0, 0.020, (1.0, 1.0, 1.0), False),
    Site("site-B", 0.30, 600.0, 0.030, (1.0, 1.0, 1.25), True),
    Site("site-C", 0.20, 1500.0, 0.025, (0.9, 0.9, 1.1), False),
    Site("site-D", 0.15, 350.0, 0.040, (1.1, 1.1, 1.5), True),
)


@dataclass
class Latent:
    """Everything the images and tables of one subject are drawn from."""

    site: str
    lesion_side: str  # left, right, bilateral, none
    onset_min: float
    onset_known: bool
    flair_amplitude: float
    tau_min: float
    flair_rel: float  # v: lesion FLAIR / normal FLAIR - 1
    t2_rel: float
    adc_ratio: float
    age: float
    sex: str
    nihss: int | None = None
    mrs_90d: int | None = None
    mrs_score: float | None = None  # the deterministic part of the outcome model
    readers: tuple[int, int, int] | None = None
    lesion_ml: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def draw_onset(rng: np.random.Generator, n: int) -> np.ndarray:
    """Onset-to-MRI times in minutes (all true values; which are 'unknown' is drawn separately)."""
    z = rng.standard_normal(n)
    t = ONSET_MEDIAN_MIN * np.exp(np.where(z < 0, z * ONSET_SIGMA_LOW, z * ONSET_SIGMA_HIGH))
    return np.clip(t, *ONSET_RANGE_MIN)


def flair_rel(t_min, amplitude, tau_min):
    return amplitude * (1.0 - np.exp(-np.asarray(t_min) / tau_min))


def draw_latent(rng: np.random.Generator, *, side: str) -> Latent:
    """Draw one subject's site, onset, lesion signal and demographics (outcome comes later, with volume)."""
    site = SITES[rng.choice(len(SITES), p=[s.share for s in SITES])].name
    onset = float(draw_onset(rng, 1)[0])
    known = bool(rng.random() >= UNKNOWN_ONSET_SHARE)
    amp = float(FLAIR_A_MEDIAN * np.exp(FLAIR_A_SIGMA * rng.standard_normal()))
    tau = float(TAU_MEDIAN_MIN * np.exp(TAU_SIGMA * rng.standard_normal()))
    v = float(flair_rel(onset, amp, tau)) if side != "none" else 0.0
    return Latent(site=site, lesion_side=side, onset_min=onset, onset_known=known, flair_amplitude=amp,
                  tau_min=tau, flair_rel=v, t2_rel=T2_SHARE * v, adc_ratio=float(rng.uniform(0.45, 0.65)),
                  age=float(np.clip(rng.normal(70, 12), 25, 98)), sex=str(rng.choice(["F", "M"])))


def draw_side(rng: np.random.Generator) -> str:
    u = rng.random()
    if u < NO_LESION_SHARE:
        return "none"
    if u < NO_LESION_SHARE + (1 - NO_LESION_SHARE) * BILATERAL_SHARE:
        return "bilateral"
    return "left" if rng.random() < 0.5 else "right"


def mrs_linear(lesion_ml, age, nihss):
    """Deterministic part of the 90-day outcome: bigger infarcts, older and sicker patients do worse."""
    return -5.5 + 0.04 * np.asarray(age) + 0.11 * np.asarray(nihss) + 0.35 * np.log1p(lesion_ml)


def finish_latent(lat: Latent, rng: np.random.Generator, *, lesion_ml: float, age: float | None = None,
                  nihss: float | None = None) -> Latent:
    """Add NIHSS, mRS at 90 days and the three readers' mismatch reads once the lesion volume is known.

    `age` / `nihss` override the drawn values (real SOOP patients' values go with their lesion).
    """
    lat.lesion_ml = float(lesion_ml)
    if age is not None:
        lat.age = float(age)
    if nihss is None:
        nihss = 1.0 + 3.0 * np.log1p(lesion_ml) + rng.normal(0, 3.0)
    lat.nihss = int(np.clip(round(float(nihss)), 0, 42))
    lat.mrs_score = float(mrs_linear(lesion_ml, lat.age, lat.nihss))
    # ordinal logit: the score plus logistic noise, cut into mRS 0-6
    s = lat.mrs_score + rng.logistic(0.0, 1.0)
    lat.mrs_90d = int(np.digitize(s, [-3.0, -1.8, -0.8, 0.0, 1.2, 2.6]))
    if lat.lesion_side != "none":
        seen = lat.flair_rel + rng.normal(0, READER_NOISE, size=3)
        lat.readers = tuple(int(s_k < thr) for s_k, thr in zip(seen, READER_THRESHOLDS))  # 1 = mismatch
    return lat


def _posterior_auc(score: np.ndarray, label: np.ndarray, *, bins: int = 200) -> float:
    """AUC of P(label | score) estimated by quantile bins: the Bayes AUC when `score` is sufficient."""
    from sklearn.metrics import roc_auc_score

    edges = np.unique(np.quantile(score, np.linspace(0, 1, bins + 1)))
    idx = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, len(edges) - 2)
    post = np.bincount(idx, weights=label, minlength=len(edges) - 1) / np.maximum(
        np.bincount(idx, minlength=len(edges) - 1), 1)
    return float(roc_auc_score(label, post[idx]))


def oracle_aucs(*, num_draws: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Bayes AUC per task from the latent model (see the module docstring)."""
    rng = np.random.default_rng(seed)
    t = draw_onset(rng, num_draws)
    amp = FLAIR_A_MEDIAN * np.exp(FLAIR_A_SIGMA * rng.standard_normal(num_draws))
    tau = TAU_MEDIAN_MIN * np.exp(TAU_SIGMA * rng.standard_normal(num_draws))
    v = flair_rel(t, amp, tau)
    # outcome: lesion volumes log-normal around 15 mL (SOOP-like), no-lesion subjects at 0
    ml = np.where(rng.random(num_draws) < NO_LESION_SHARE, 0.0, np.exp(rng.normal(np.log(15), 1.4, num_draws)))
    age = np.clip(rng.normal(70, 12, num_draws), 25, 98)
    nihss = np.clip(np.round(1.0 + 3.0 * np.log1p(ml) + rng.normal(0, 3.0, num_draws)), 0, 42)
    score = mrs_linear(ml, age, nihss)
    mrs = np.digitize(score + rng.logistic(0, 1, num_draws), [-3.0, -1.8, -0.8, 0.0, 1.2, 2.6])
    return {
        # DWI shows every infarct from the first minutes: the latent lesion decides the half without error
        "lesion_present": 1.0,
        "tss_lt_3h": _posterior_auc(-v, (t < 180).astype(float)),
        "tss_lt_4h5": _posterior_auc(-v, (t < 270).astype(float)),
        "mrs_gt_2": _posterior_auc(score, (mrs > 2).astype(float)),
    }
