"""Disentanglement on SynthTalk: how well each latent space predicts each true factor group.

For every (space, group) pair a ridge regression (closed form, inputs standardised on the training frames) is fit
from the space's per-frame weights to the group's factors and scored by R² on held-out frames. A disentangled model
has a high diagonal (each space explains its own factors) and low off-diagonal entries (no leakage). Pure numpy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPACES: tuple[str, ...] = ("mouth", "pose", "eye", "expression")
# Factor group -> SynthTalk factor names; "emotion" becomes a one-hot over EMOTIONS.
FACTOR_GROUPS: dict[str, tuple[str, ...]] = {
    "mouth": ("mouth_open", "mouth_width"),
    "pose": ("yaw", "pitch", "roll", "tx", "ty"),
    "eye": ("blink_left", "blink_right", "gaze_x", "gaze_y"),
    "expression": ("emotion", "intensity"),
}
EMOTIONS: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "surprised")  # SynthTalk's index order


@dataclass
class Disentanglement:
    """R² of each space (rows) predicting each factor group (columns), with its summary."""

    matrix: np.ndarray  # (len(spaces), len(groups)) held-out R², clipped to [0, 1]
    spaces: tuple[str, ...]  # row names
    groups: tuple[str, ...]  # column names

    @property
    def diagonal_mean(self) -> float:
        """Mean R² of each space on its own group (spaces and groups matched by name)."""
        vals = [self.matrix[i, self.groups.index(s)] for i, s in enumerate(self.spaces) if s in self.groups]
        return float(np.nanmean(vals)) if vals else float("nan")

    @property
    def leakage(self) -> float:
        """The worst off-diagonal R²: how much some space explains another space's factors."""
        off = [
            self.matrix[i, j]
            for i, s in enumerate(self.spaces)
            for j, g in enumerate(self.groups)
            if s != g and np.isfinite(self.matrix[i, j])
        ]
        return float(max(off)) if off else float("nan")

    def to_dict(self) -> dict:
        return {
            "spaces": list(self.spaces),
            "groups": list(self.groups),
            "matrix": [
                [None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in self.matrix
            ],
            "diagonal_mean": self.diagonal_mean,
            "leakage": self.leakage,
        }


def ridge_r2(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, alpha: float = 1e-3
) -> float:
    """Held-out R² of a ridge regression x -> y, averaged over y's columns that vary on the held-out frames.

    Inputs are standardised with the training statistics (constant inputs dropped); `alpha` is the ridge strength
    relative to the number of training frames. Negative R² (worse than the mean) is reported as 0. Returns NaN when
    no output column varies on the held-out frames.
    """
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test, np.float64)
    y_train = np.asarray(y_train, np.float64).reshape(len(y_train), -1)
    y_test = np.asarray(y_test, np.float64).reshape(len(y_test), -1)
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0)
    keep = sd > 1e-12
    a = (x_train[:, keep] - mu[keep]) / sd[keep]
    b = (x_test[:, keep] - mu[keep]) / sd[keep]
    y_mu = y_train.mean(axis=0)
    if a.shape[1] == 0:
        pred = np.broadcast_to(y_mu, y_test.shape)
    else:
        gram = a.T @ a + alpha * len(a) * np.eye(a.shape[1])
        coef = np.linalg.solve(gram, a.T @ (y_train - y_mu))
        pred = b @ coef + y_mu
    sst = ((y_test - y_test.mean(axis=0)) ** 2).sum(axis=0)
    sse = ((y_test - pred) ** 2).sum(axis=0)
    varies = sst > 1e-12 * len(y_test)
    if not varies.any():
        return float("nan")
    r2 = 1.0 - sse[varies] / sst[varies]
    return float(np.clip(r2, 0.0, 1.0).mean())


def _as_2d(name: str, arr: np.ndarray, n: int | None) -> np.ndarray:
    a = np.asarray(arr, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"disentanglement: {name} must be (N,) or (N, k) per frame, got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(
            f"disentanglement: {name} has {len(a)} frames but others have {n}; pass aligned frames"
        )
    if not np.isfinite(a).all():
        raise ValueError(f"disentanglement: {name} holds NaN or inf; drop those frames first")
    return a


def disentanglement(
    weights: Mapping[str, np.ndarray],
    factors: Mapping[str, np.ndarray],
    train: np.ndarray | None = None,
    holdout_fraction: float = 0.3,
    seed: int = 0,
    alpha: float = 1e-3,
) -> Disentanglement:
    """The space x group R² matrix.

    weights: space -> (N, n_s) per-frame weights; factors: group -> (N, k) true factors (see `factor_groups`).
    train: boolean mask (N,) of training frames; when None a random `holdout_fraction` of frames is held out
    (better: pass a mask that holds out whole clips, so neighbouring frames do not leak into the test).
    """
    if not weights or not factors:
        raise ValueError("disentanglement: need at least one space in weights and one group in factors")
    n = None
    xs, ys = {}, {}
    for name, arr in weights.items():
        xs[name] = _as_2d(f"weights[{name!r}]", arr, n)
        n = len(xs[name])
    for name, arr in factors.items():
        ys[name] = _as_2d(f"factors[{name!r}]", arr, n)
    if train is None:
        if not 0 < holdout_fraction < 1:
            raise ValueError(f"disentanglement: holdout_fraction must be in (0, 1), got {holdout_fraction}")
        rng = np.random.default_rng(seed)
        train = np.ones(n, bool)
        train[rng.permutation(n)[: max(1, int(round(holdout_fraction * n)))]] = False
    train = np.asarray(train, bool)
    if train.shape != (n,):
        raise ValueError(f"disentanglement: train mask must have shape ({n},), got {train.shape}")
    if train.sum() < 2 or (~train).sum() < 2:
        raise ValueError("disentanglement: need at least 2 training and 2 held-out frames")
    spaces, groups = tuple(xs), tuple(ys)
    m = np.full((len(spaces), len(groups)), np.nan)
    for i, s in enumerate(spaces):
        for j, g in enumerate(groups):
            x, y = xs[s], ys[g]
            m[i, j] = ridge_r2(x[train], y[train], x[~train], y[~train], alpha)
    return Disentanglement(matrix=m, spaces=spaces, groups=groups)


def factor_groups(
    source: str | Path | Mapping | Sequence, groups: Mapping[str, Sequence[str]] = FACTOR_GROUPS
) -> dict[str, np.ndarray]:
    """Group SynthTalk factors into arrays: group -> (N, k), frames of every source concatenated.

    source: a sidecar JSON path, a JSON string (e.g. a segment's `factors` column), a dict (the sidecar or its
    `factors`), or a list of any of these. `emotion` (index or name) becomes a one-hot over EMOTIONS.
    """
    items = (
        list(source) if isinstance(source, Sequence) and not isinstance(source, (str, bytes)) else [source]
    )
    parts: dict[str, list[np.ndarray]] = {g: [] for g in groups}
    for item in items:
        f = _load_factors(item)
        n = len(next(iter(f.values())))
        for g, names in groups.items():
            cols = []
            for name in names:
                if name not in f:
                    raise KeyError(
                        f"factor_groups: factor {name!r} missing (have {sorted(f)}); is this SynthTalk data?"
                    )
                vals = f[name]
                if len(vals) != n:
                    raise ValueError(f"factor_groups: factor {name!r} has {len(vals)} frames, expected {n}")
                if name == "emotion":
                    idx = np.array([EMOTIONS.index(v) if isinstance(v, str) else int(v) for v in vals])
                    cols.append(np.eye(len(EMOTIONS))[idx])
                else:
                    cols.append(np.asarray(vals, np.float64)[:, None])
            parts[g].append(np.concatenate(cols, axis=1))
    return {g: np.concatenate(p, axis=0) for g, p in parts.items()}


def _load_factors(item) -> dict:
    if isinstance(item, Path) or (isinstance(item, str) and not item.lstrip().startswith("{")):
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"factor_groups: {path} does not exist; pass a SynthTalk sidecar JSON")
        item = json.loads(path.read_text())
    elif isinstance(item, str):
        item = json.loads(item)
    if not isinstance(item, Mapping):
        raise TypeError(f"factor_groups: expected a JSON object of factors, got {type(item).__name__}")
    f = item.get("factors", item)
    if not f:
        raise ValueError("factor_groups: no factors in this item (a sidecar without SynthTalk ground truth?)")
    return f


def heatmap(result: Disentanglement, path: str | Path, title: str = "Disentanglement (held-out R²)") -> Path:
    """Render the matrix as an annotated heatmap PNG (matplotlib, Agg) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 1.1 * len(result.groups), 1.0 + 0.9 * len(result.spaces)), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.nan_to_num(result.matrix, nan=0.0), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(result.groups)), [f"{g}\nfactors" for g in result.groups])
    ax.set_yticks(range(len(result.spaces)), [f"{s} space" for s in result.spaces])
    for i in range(len(result.spaces)):
        for j in range(len(result.groups)):
            v = result.matrix[i, j]
            text = "n/a" if not np.isfinite(v) else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=9)
    ax.set_title(f"{title}\ndiagonal {result.diagonal_mean:.2f}, leakage {result.leakage:.2f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
