"""Stability metrics of runs and of LR grids (spread over seeds: :mod:`analysis.stats`).

Definitions (the reference is ``docs/analysis.md``):

- held-out loss: ``eval_loss``, the run's held-out cross-entropy at its end (annealed).
- unigram / bigram level: the corpus's held-out n-gram losses (:mod:`analysis.corpus`).
- loss at init: ``ln(vocab_size)`` when given, else the first finite logged loss.
- final loss: mean of the finite training losses among the last ``k`` logged records
  (``FINAL_K``); ``inf`` when the last logged loss is non-finite (used only without eval).
- diverged: some logged loss is non-finite, or the held-out loss ends above the unigram level
  (without a held-out loss: the final training loss above the loss at init).
- LR sensitivity (Wortsman et al. 2023): ``mean_lr(min(eval, unigram)) - min_lr(eval)``: capped
  at the unigram level, so a recipe that learns nothing is not "stable", it is untestable.
- max stable LR: the largest LR on the grid whose run did not diverge; censored (``>=``) when
  none diverged, ``<`` the grid when all did.
- spike incidents: event (or spiky-step) steps merged when closer than ``merge_gap`` steps.
- spike score (OLMo 2): fraction of evaluated steps whose value exceeds the mean plus
  ``n_sigma`` standard deviations of the previous ``window`` values.
- steps to recover: steps from an incident's onset until the loss is back at or below the mean
  of the ``ref_window`` finite losses logged before the onset.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis.stats import over_seeds

if TYPE_CHECKING:
    from analysis.runs import RunData

FINAL_K = 20
"""Number of last logged records averaged into the final loss."""
MERGE_GAP = 20
"""Events (or spiky steps) at most this many steps apart belong to one incident."""
UNFINISHED = ("running", "incomplete")
"""Statuses whose final loss is not final; grid metrics skip them unless they diverged."""

Values = Sequence[float] | np.ndarray | pd.Series


def _floats(values: Values) -> np.ndarray:
    return np.asarray(values, dtype=float)


def _finite(values: Values) -> np.ndarray:
    a = _floats(values)
    return a[np.isfinite(a)]


# --- per-run losses -------------------------------------------------------------------------


def loss_at_init(loss: Values, *, vocab_size: int | None = None) -> float:
    """Loss at initialisation.

    Args:
        loss: Logged losses in step order.
        vocab_size: If given, the loss of a uniform prediction, ``ln(vocab_size)``, is returned.

    Returns:
        ``ln(vocab_size)``, else the first finite logged loss (NaN if there is none).
    """
    if vocab_size is not None:
        return math.log(vocab_size)
    a = _finite(loss)
    return float(a[0]) if a.size else math.nan


def final_loss(loss: Values, k: int = FINAL_K) -> float:
    """Mean of the finite losses among the last ``k`` logged records.

    Averaging keeps one noisy step from deciding the result (it moves it by 1/k of its jump).

    Returns:
        The mean; ``inf`` if the last logged loss is non-finite (the run ended diverged);
        NaN if nothing was logged.
    """
    a = _floats(loss)
    if a.size == 0:
        return math.nan
    if not np.isfinite(a[-1]):
        return math.inf
    tail = a[-k:]
    return float(tail[np.isfinite(tail)].mean())


def best_loss(loss: Values) -> float:
    """Lowest finite logged loss (NaN if there is none)."""
    a = _finite(loss)
    return float(a.min()) if a.size else math.nan


def is_diverged(loss: Values, *, init: float | None = None, k: int = FINAL_K,
                eval_loss: float = math.nan, unigram: float = math.nan) -> bool:
    """Whether a run diverged: any non-finite logged loss, or a held-out loss above the unigram
    level (a model that does worse than token frequencies); without a held-out loss or a
    unigram level, a final training loss above the loss at init.

    Args:
        loss: Logged losses in step order.
        init: Loss at init; default: :func:`loss_at_init` of ``loss``.
        k: Records averaged into the final loss.
        eval_loss: The run's held-out loss at its end.
        unigram: The corpus's held-out unigram level.
    """
    a = _floats(loss)
    if a.size and not np.isfinite(a).all():
        return True
    if math.isfinite(unigram) and not math.isnan(eval_loss):
        return not math.isfinite(eval_loss) or eval_loss > unigram
    if a.size == 0:
        return False
    init = loss_at_init(a) if init is None else init
    return bool(final_loss(a, k) > init)


def corpus_levels(data: Mapping[str, Any]) -> tuple[float, float]:
    """(unigram, bigram) held-out levels of a run's data config (``config.yaml``'s ``data``):
    the sample corpus with its tokenizer; NaN for other data (not known here)."""
    if not data or data.get("name", "sample") != "sample" or data.get("blend"):
        return math.nan, math.nan  # no data section recorded, or other data
    from analysis.corpus import sample_levels

    try:
        levels = sample_levels(data.get("tokenizer") or "sample", data.get("split", "969,30,1"))
    except (OSError, RuntimeError, ValueError):
        return math.nan, math.nan
    return levels.unigram, levels.bigram


INCIDENT_KINDS = {
    "num_loss_spikes": "loss spikes and blow-ups: events of kind spike on the loss "
                       "(loss_spike, loss_rebound, the baselines' loss rules)",
    "num_grad_spikes": "grad-norm spikes: events of kind spike on the grad norm",
    "num_leading": "leading alerts: events of kind leading (attention logits, logsumexp, "
                   "update ratios)",
    "num_nonfinite": "non-finite values: events of kind nonfinite",
}
"""The incident counts of the runs table, each merged like :func:`merge_incidents`."""


def incidents_by_kind(events: Iterable[Mapping[str, Any]],
                      merge_gap: int = MERGE_GAP) -> dict[str, int]:
    """Detector incidents of a run, counted apart by what they flag (:data:`INCIDENT_KINDS`)."""
    steps: dict[str, list[int]] = {k: [] for k in INCIDENT_KINDS}
    for e in events:
        if "step" not in e:
            continue
        kind, metric = e.get("kind", "spike"), str(e.get("metric", ""))
        if kind == "nonfinite":
            steps["num_nonfinite"].append(e["step"])
        elif kind == "leading":
            steps["num_leading"].append(e["step"])
        elif metric.startswith("grad_norm"):
            steps["num_grad_spikes"].append(e["step"])
        else:
            steps["num_loss_spikes"].append(e["step"])
    return {k: len(merge_incidents(v, merge_gap)) for k, v in steps.items()}


# --- LR grids -------------------------------------------------------------------------------


def lr_sensitivity(final: Values, init: float | Values) -> float:
    """LR sensitivity of one grid (Wortsman et al. 2023); lower is more stable.

    ``mean over the grid of min(final, init) - min over the grid of final``. A missing (NaN)
    final loss counts as diverged (it contributes ``init``).

    Args:
        final: Final loss of each LR on the grid (one seed).
        init: Loss at init, one value or one per LR.

    Returns:
        The sensitivity; NaN if no LR ended with a finite loss.
    """
    f = _floats(final)
    f = np.where(np.isnan(f), np.inf, f)
    i = np.broadcast_to(_floats(init), f.shape)
    best = f.min() if f.size else math.inf
    if not np.isfinite(best):
        return math.nan
    return float(np.minimum(f, i).mean() - best)


def max_stable_lr(lrs: Values, diverged: Sequence[bool] | np.ndarray | pd.Series) -> float:
    """Largest LR whose run did not diverge (NaN if every run diverged)."""
    lr = _floats(lrs)
    ok = ~np.asarray(diverged, dtype=bool)
    return float(lr[ok].max()) if ok.any() else math.nan


# --- spikes ---------------------------------------------------------------------------------


def merge_incidents(steps: Iterable[int], merge_gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """Group event steps into incidents.

    A step at most ``merge_gap`` steps after the previous one joins its incident, so a blow-up
    that fires a detector on every step, or several detectors on one spike, counts once.

    Returns:
        ``(first_step, last_step)`` of each incident, in step order.
    """
    out: list[tuple[int, int]] = []
    for s in sorted({int(s) for s in steps if s is not None and s == s}):  # s == s: not NaN
        if out and s - out[-1][1] <= merge_gap:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def count_incidents(
    events: pd.DataFrame,
    *,
    merge_gap: int = MERGE_GAP,
    kinds: Collection[str] | None = None,
    detectors: Collection[str] | None = None,
) -> pd.Series:
    """Spike incidents per run from an events table (:attr:`RunData.events`).

    Args:
        events: Events with ``run_id``, ``step``, ``kind`` and ``detector`` columns.
        merge_gap: See :func:`merge_incidents`.
        kinds: Count only events of these kinds (default: all).
        detectors: Count only events of these detectors (default: all).

    Returns:
        Incident count indexed by ``run_id`` (runs without a matching event are absent).
    """
    keep = pd.Series(True, index=events.index)
    if kinds is not None:
        keep &= events["kind"].isin(list(kinds))
    if detectors is not None:
        keep &= events["detector"].isin(list(detectors))
    grouped = events[keep].groupby("run_id")["step"]
    return grouped.agg(lambda s: len(merge_incidents(s, merge_gap))).rename("incidents")


def spike_rate(count: float, steps: float) -> float:
    """Spikes per 1000 training steps (NaN if ``steps`` is not positive)."""
    return 1000.0 * count / steps if steps and steps > 0 else math.nan


def _previous_window(values: Values, window: int, min_periods: int) -> tuple[pd.Series, ...]:
    s = pd.Series(_floats(values))
    finite = pd.Series(np.isfinite(s.to_numpy()))
    roll = s.where(finite).shift(1).rolling(window, min_periods=min(min_periods, window))
    return s, finite, roll.mean(), roll.std()


def loss_spike_steps(
    loss: Values,
    *,
    window: int = 50,
    n_sigma: float = 6.0,
    min_rel: float = 0.05,
    min_periods: int = 10,
) -> np.ndarray:
    """Recompute spiky steps from the loss alone (a simple rule, independent of detectors).

    A logged record is spiky if its loss is non-finite, or if it exceeds the mean ``mu`` of the
    previous ``window`` finite logged losses by more than ``n_sigma`` standard deviations AND by
    more than ``min_rel * mu`` (a relative floor, so that noise on a flat curve is no spike).
    Records with fewer than ``min_periods`` finite predecessors are never spiky unless
    non-finite. Merge the spiky steps with :func:`merge_incidents` to count incidents.

    Returns:
        Boolean mask, one entry per logged record.
    """
    s, finite, mu, sd = _previous_window(loss, window, min_periods)
    jump = (s > mu + n_sigma * sd) & (s > (1.0 + min_rel) * mu)
    return (~finite | jump).to_numpy()


def spike_score(
    values: Values, *, window: int = 1000, n_sigma: float = 7.0, min_periods: int | None = None
) -> float:
    """OLMo-2-style spike score of one series (loss or grad norm).

    The fraction of evaluated records whose value is non-finite or above ``mean + n_sigma *
    std`` of the previous ``window`` finite values. A record is evaluated once it has
    ``min_periods`` finite predecessors (default ``min(window, 100)``), so a run shorter than
    ``window`` is scored against all its earlier values. Pass a smaller ``window`` for short runs.

    Returns:
        The fraction in [0, 1]; NaN if no record could be evaluated.
    """
    periods = min(window, 100) if min_periods is None else min_periods
    s, finite, mu, sd = _previous_window(values, window, periods)
    evaluated = mu.notna() & sd.notna()
    spiky = (~finite | (s > mu + n_sigma * sd)) & evaluated
    n = int(evaluated.sum())
    return float(spiky.sum()) / n if n else math.nan


def steps_to_recover(
    steps: Values, loss: Values, onsets: Iterable[int], *, ref_window: int = 10
) -> np.ndarray:
    """Steps from each incident onset until the loss is back at its pre-spike level.

    The pre-spike level is the mean of the last ``ref_window`` finite losses logged before the
    onset. From the onset on, the first record above that level (or non-finite) starts the
    excursion; the answer is ``recovery_step - onset`` for the first later finite record at or
    below the level, 0 if the loss never left the level, and NaN if it never came back (or no
    loss was logged before the onset).
    """
    st, lo = _floats(steps), _floats(loss)
    finite = np.isfinite(lo)
    out = []
    for onset in onsets:
        before = lo[(st < onset) & finite][-ref_window:]
        if before.size == 0:
            out.append(math.nan)
            continue
        level = before.mean()
        idx = np.flatnonzero(st >= onset)
        above = ~finite[idx] | (lo[idx] > level)
        if not above.any():
            out.append(0.0)
            continue
        rest = idx[int(np.argmax(above)) :]
        back = rest[finite[rest] & (lo[rest] <= level)]
        out.append(float(st[back[0]] - onset) if back.size else math.nan)
    return np.asarray(out, dtype=float)


_GRID_COLUMNS = ["lr_sensitivity", "max_stable_lr", "stable_censored", "best_lr",
                 "optimum_interior", "best_eval_loss", "n_lrs", "cap"]


def held_out(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each run's loss for grid metrics and the level it is capped at.

    Where the corpus's unigram level is known: the held-out loss, capped at the unigram level
    (a run that never reached its evaluation because it diverged, or because a spike policy
    stopped it, counts as infinite, so capped there too). Elsewhere (other data): the final
    training loss, capped at the loss at init.
    """
    value = runs["final_loss"].astype(float)
    cap = runs["loss_at_init"].astype(float)
    if "eval_loss" in runs and "unigram" in runs:
        known = runs["unigram"].notna()
        held = runs["eval_loss"].astype(float)
        gave_up = runs["status"].eq("stopped") if "status" in runs else False
        died = held.isna() & (runs["diverged"].astype(bool) | gave_up)
        held = held.where(~died, np.inf).fillna(value)
        value = value.where(~known, held)
        cap = cap.where(~known, runs["unigram"].astype(float))
    return value, cap


def grid_per_seed(
    runs: pd.DataFrame,
    by: Sequence[str] = (),
    *,
    lr_col: str = "optim.lr",
    seed_col: str = "trainer.seed",
) -> pd.DataFrame:
    """LR-grid metrics for each group and seed.

    Uses the held-out loss capped at the unigram level (:func:`held_out`), ``diverged`` and
    ``status``. Runs still running or incomplete are skipped unless they diverged. Several runs
    at one (group, seed, LR) are averaged (diverged if any diverged).

    Returns:
        One row per group and seed: ``by``, ``seed_col``, ``lr_sensitivity``,
        ``max_stable_lr``, ``stable_censored`` (">=": none diverged, the onset lies above the
        grid; "<": all diverged; ""), ``best_lr``, ``optimum_interior`` (the best LR is not at
        an end of the grid), ``best_eval_loss``, ``n_lrs``, ``cap``.
    """
    for col in (lr_col, seed_col):
        if col not in runs.columns:
            raise KeyError(f"column {col!r} is not in the runs table")
    use = runs[~runs["status"].isin(UNFINISHED) | runs["diverged"].astype(bool)]
    value, cap = held_out(use)
    use = use.assign(_value=value, _cap=cap)
    keys = [*by, seed_col]
    rows = []
    for key, group in use.groupby(keys, dropna=False, sort=True):
        grid = group.groupby(lr_col, sort=True).agg(
            value=("_value", "mean"), cap=("_cap", "mean"), div=("diverged", "any"))
        v = grid["value"].fillna(np.inf)
        best = v.idxmin() if np.isfinite(v.min()) else math.nan
        lrs = list(grid.index)
        stable = max_stable_lr(grid.index, grid["div"])
        censored = ">=" if not grid["div"].any() else ("<" if grid["div"].all() else "")
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "lr_sensitivity": lr_sensitivity(grid["value"], grid["cap"]),
                "max_stable_lr": stable,
                "stable_censored": censored,
                "best_lr": best,
                "optimum_interior": bool(len(lrs) > 2 and best == best
                                         and lrs[0] < best < lrs[-1]),
                "best_eval_loss": v.min() if np.isfinite(v.min()) else math.nan,
                "n_lrs": len(grid),
                "cap": float(grid["cap"].mean()),
            }
        )
    return pd.DataFrame(rows, columns=[*keys, *_GRID_COLUMNS])


def grid_metrics(
    runs: pd.DataFrame,
    by: Sequence[str] = (),
    *,
    lr_col: str = "optim.lr",
    seed_col: str = "trainer.seed",
    **ci: object,
) -> pd.DataFrame:
    """LR sensitivity and max stable LR of each group, over seeds.

    Returns:
        Long table: ``by``, ``metric`` (``lr_sensitivity`` | ``max_stable_lr`` |
        ``best_eval_loss``), ``mean``, ``lo``, ``hi``, ``n``. The max stable LR is averaged
        in log space (geometric mean and CI).
    """
    per_seed = grid_per_seed(runs, by, lr_col=lr_col, seed_col=seed_col)
    parts = []
    for metric in ("lr_sensitivity", "max_stable_lr", "best_eval_loss"):
        opts = {**ci, "log": metric == "max_stable_lr"}
        part = over_seeds(per_seed, metric, by, **opts)
        part.insert(len(by), "metric", metric)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# --- per-run spike table --------------------------------------------------------------------


def run_metrics(
    data: RunData,
    *,
    onsets: str = "events",
    merge_gap: int = MERGE_GAP,
    score_window: int = 1000,
    ref_window: int = 10,
) -> pd.DataFrame:
    """Spike metrics of each run, recomputed from ``metrics.jsonl`` (and ``events.jsonl``).

    Args:
        data: Loaded runs (:func:`analysis.runs.load_runs`).
        onsets: Incidents whose recovery is measured: ``"events"`` (from ``events.jsonl``) or
            ``"loss"`` (from :func:`loss_spike_steps`).
        merge_gap: See :func:`merge_incidents`.
        score_window: Window of :func:`spike_score`.
        ref_window: See :func:`steps_to_recover`.

    Returns:
        One row per run: ``run_id``, ``loss_spikes`` (incidents of the loss rule),
        ``loss_spike_rate`` (per 1k steps), ``spike_score_loss``, ``spike_score_grad_norm``,
        ``recover_steps_mean``, ``recover_steps_max``, ``unrecovered`` (incidents never
        recovered). Runs that logged nothing are absent.
    """
    if onsets not in ("events", "loss"):
        raise ValueError(f"onsets must be 'events' or 'loss', got {onsets!r}")
    steps_of = data.runs.set_index("run_id")["steps"]
    events = data.events.groupby("run_id")["step"]
    rows = []
    for run_id, m in data.metrics.groupby("run_id", sort=False):
        step, loss = m["step"].to_numpy(), m["loss"].to_numpy(dtype=float)
        spiky = merge_incidents(step[loss_spike_steps(loss)], merge_gap)
        if onsets == "loss":
            starts = [a for a, _ in spiky]
        else:
            ev = events.get_group(run_id) if run_id in events.groups else []
            starts = [a for a, _ in merge_incidents(ev, merge_gap)]
        rec = steps_to_recover(step, loss, starts, ref_window=ref_window)
        recovered = rec[np.isfinite(rec)]
        # In the wide table NaN also means "not logged at this step"; a NaN grad norm comes
        # with a NaN loss, which the loss score counts.
        grad = m["grad_norm"].dropna() if "grad_norm" in m else pd.Series(dtype=float)
        rows.append(
            {
                "run_id": run_id,
                "loss_spikes": len(spiky),
                "loss_spike_rate": spike_rate(len(spiky), steps_of.get(run_id, math.nan)),
                "spike_score_loss": spike_score(loss, window=score_window),
                "spike_score_grad_norm": spike_score(grad, window=score_window),
                "recover_steps_mean": recovered.mean() if recovered.size else math.nan,
                "recover_steps_max": recovered.max() if recovered.size else math.nan,
                "unrecovered": int(np.isnan(rec).sum()),
            }
        )
    return pd.DataFrame(rows)
