"""Weights & Biases: metrics under stable names, detector events as a table, one alert per incident.

Names (:func:`wandb_name`): the loop's ``metrics.jsonl`` keys go to ``train/*`` (what is
optimised), ``spike/*`` (statistics the detectors watch), ``perf/*`` (throughput) or ``other/*``.
Every row is logged with our ``step`` as W&B's step metric, so a chart's x axis is the training
step even across resumes. Detector events add ``spike/events`` (their running count),
``spike/marker/<metric>`` (the metric's value at each event step, to overlay on its curve) and the
``spike/events_table`` table: one incremental W&B table (``log_mode="INCREMENTAL"``), each log
uploading only the events since the previous one: at the first event, then at most every
``table_interval_steps`` while new events arrive, and at close.

Alerts: the events of one step form an incident, and an incident sends at most one ``run.alert``
(title under 64 characters, WARN or ERROR). Events whose action is ``log`` (the policy said "only
log") never alert. The client throttles: at most one alert per (detector, metric) every
``alert_min_interval_steps`` steps (errors bypass this), and at most ``max_alerts`` per run.

Each flush is logged step by step: a step's metrics row together with the markers of the events
found in it, so events never reach W&B before the row they came from.

The W&B run (:meth:`WandbSink.identity`): its id is drawn at the first start and kept, with its
name, group and job type, in ``<run_dir>/wandb_run.json`` before ``wandb.init``, so a resumed or
requeued run continues the same W&B run, also after a crash before the first checkpoint. Name,
group, job type, project, entity and mode are the config's (``logger.wandb.*``), else W&B's
environment variables (``WANDB_NAME``, ``WANDB_RUN_GROUP``, ...), else what the launch says
(:class:`~stability.sinks.config.RunLabels`: the overrides as the name, the study or sweep as
the group); tags always include the recipe and size. An in-process rollback does not rewind
the sink (``restore_on_rollback = False``): W&B has already seen what came after the checkpoint.
Built on rank 0 only.
``logger.wandb.mode=offline`` writes ``<run_dir>/wandb/offline-run-*/`` for
``wandb sync``; see docs/wandb.md.
"""

from __future__ import annotations

import json
import math
import secrets
import string
from pathlib import Path
from typing import Any

import wandb

from stability.callbacks import Callback, Control, Flush, StepState
from stability.runfiles import RunFiles, write_json
from stability.sinks.config import RunLabels, WandbConfig

TRAIN_KEYS = frozenset({"loss", "grad_norm", "lr", "tokens", "z_loss", "eval_loss"})
"""What is optimised and how: ``train/<key>``."""

SPIKE_KEYS = frozenset({
    "logsumexp_mean", "logit_max_abs", "attn_logit_max", "update_ratio_max", "embedding_std",
    "adam_v_below_eps", "spike_score", "skipped", "update_ratio", "param_norm",
})
"""Statistics the detectors watch: ``spike/<key>``. Per-layer keys (``grad_norm/layer_3``,
``attn_logit_max/layer_0``) go there too when their family (the part before the first ``/``) is
here or in TRAIN_KEYS. Add a new monitor's key here to keep it out of ``other/``."""

PERF_KEYS = frozenset({"tokens_per_s", "step_time", "mfu", "model_flops_per_s", "time"})
"""Throughput and wall clock: ``perf/<key>``."""

STEP_KEY = "step"
"""Our step counter, W&B's step metric (the x axis of every chart)."""

EVENTS_KEY = "spike/events"
"""Running count of detector events."""

TABLE_KEY = "spike/events_table"
"""The W&B table of the events (incremental: each log adds the new rows)."""

MARKER_PREFIX = "spike/marker/"
"""``spike/marker/<metric>``: the metric's value at each event step (sparse; spike markers)."""

TABLE_COLUMNS = ("step", "detector", "metric", "value", "threshold", "score", "severity", "kind",
                 "action", "message")
"""Columns of the events table: the fields of an events.jsonl row."""

MAX_TABLE_ROWS = 10_000
"""Events kept in the sink's checkpointed state, to start the table again after a resume (the
latest ones); events.jsonl keeps them all."""

ALERT_WAIT_SECONDS = 60
"""``wait_duration`` of every alert: W&B's server-side per-title throttle (60 s is its minimum).
Our titles name the step, so the client-side throttle below is the one that matters."""

TITLE_MAX = 63
"""W&B requires alert titles shorter than 64 characters."""

TITLES = {"spike": "{metric} spike at step {step}",
          "nonfinite": "non-finite {metric} at step {step}",
          "leading": "{metric} rising at step {step}"}
"""Alert titles by event kind."""


def wandb_name(key: str) -> str:
    """The W&B name of a ``metrics.jsonl`` key.

    ``loss``, ``grad_norm``, ``lr``, ``tokens``, ``z_loss`` -> ``train/<key>``; monitor statistics
    (``attn_logit_max``, ``spike_score``, per-layer ``grad_norm/layer_N``, ...) -> ``spike/<key>``;
    ``tokens_per_s``, ``step_time``, ``mfu``, ``time`` -> ``perf/<key>``; ``step`` stays ``step``;
    anything else -> ``other/<key>``.
    """
    if key == STEP_KEY:
        return key
    if key in TRAIN_KEYS:
        return f"train/{key}"
    if key in PERF_KEYS:
        return f"perf/{key}"
    family = key.split("/", 1)[0]
    if key in SPIKE_KEYS or ("/" in key and (family in SPIKE_KEYS or family in TRAIN_KEYS)):
        return f"spike/{key}"
    return f"other/{key}"


def _number(value: Any) -> float | int | None:
    """A loggable number (NaN/Inf kept: W&B records them), or None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    try:  # numpy / torch scalars
        return float(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float:
    number = _number(value)
    return float("nan") if number is None else float(number)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)


class WandbSink(Callback):
    """Logs metrics, events and alerts to one W&B run per run directory.

    Args:
        cfg: ``logger.wandb``.
        run_dir: The run directory (W&B's local files go to ``<run_dir>/wandb``).
        config: The run's resolved config, as W&B's run config.
        labels: The launch's name and group for the run (``stability.train``).
    """

    name = "wandb"
    restore_on_rollback = False

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any],
                 labels: RunLabels | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.config = config
        self.labels = labels or RunLabels()
        self.run: Any = None  # wandb.Run once started
        self.run_id: str | None = None
        self.events: list[dict[str, Any]] = []
        self.table: Any = None  # the incremental wandb.Table of this process, once logged
        self.pending: list[dict[str, Any]] = []  # events not yet added to it
        self.event_count = 0
        self.last_alert: dict[str, int] = {}  # "detector|metric" -> step of its last alert
        self.alerts_sent = 0
        self.alerts_suppressed = 0
        self.table_step: int | None = None  # step of the last table logged
        self.table_rows = 0  # event_count when it was logged

    # ------------------------------------------------------------------ hooks
    def on_restore(self, state: StepState, reason: str) -> None:
        if reason == "resume":  # after the checkpoint (if any) gave us the run id back
            self._start()

    def _start(self) -> None:
        """``wandb.init`` once, continuing this run directory's W&B run if there is one."""
        if self.run is not None:
            return
        identity = self.identity()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(RunFiles(self.run_dir).wandb_run, identity)  # before W&B can fail
        self.run_id = identity["id"]
        self.run = wandb.init(
            mode=self.cfg.resolved_mode(), project=self.cfg.resolved("project"),
            entity=self.cfg.resolved("entity"), name=identity["name"], group=identity["group"],
            job_type=identity["job_type"], tags=self.tags(), dir=str(self.run_dir),
            config=self.config, id=self.run_id, resume="allow")
        self.run.define_metric(STEP_KEY, hidden=True)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def identity(self) -> dict[str, Any]:
        """The W&B run's ``id``, ``name``, ``group`` and ``job_type``.

        The id is the one in ``wandb_run.json`` (written at the run's first start), else the
        checkpoint's (run directories from before that file), else a new one. The others are
        the config's or W&B's environment variable's when set, else the stored ones (a resume
        keeps what the run started with), else the launch's labels (the run directory's name
        when there are none) and job type ``train``.
        """
        stored = _read_json(RunFiles(self.run_dir).wandb_run)
        out = {"id": stored.get("id") or self.run_id or new_run_id()}
        launch = {"name": self.labels.name or self.run_dir.resolve().name,
                  "group": self.labels.group, "job_type": self.cfg.resolved("job_type")}
        for key, fallback in launch.items():
            out[key] = self.cfg.resolved(key, default=False) or stored.get(key) or fallback
        return out

    def tags(self) -> list[str]:
        """``logger.wandb.tags`` and the recipe and size names, each once."""
        extra = [str(self.config[k]) for k in ("recipe", "size") if self.config.get(k)]
        return list(dict.fromkeys([*self.cfg.tags, *extra]))

    def on_metrics(self, state: StepState, flush: Flush, control: Control) -> None:
        self._start()  # no-op once started (on_restore starts it in the loop)
        for row in flush.rows:
            incident = flush.events_at(row["step"])
            self.event_count += len(incident)
            numbers = {k: _number(v) for k, v in row.items()}
            data = {wandb_name(k): v for k, v in numbers.items() if v is not None}
            data.update({MARKER_PREFIX + str(e.get("metric", "unknown")): _float(e.get("value"))
                         for e in incident})
            data[EVENTS_KEY] = self.event_count
            self.run.log(data)
            if incident:
                rows = [self._row(e) for e in incident]
                self.events.extend(rows)
                self.pending.extend(rows)
                self._alert(row["step"], incident)
        del self.events[:-MAX_TABLE_ROWS]
        if flush.events:
            step = flush.rows[-1]["step"]
            since = None if self.table_step is None else abs(step - self.table_step)
            if since is None or since >= self.cfg.table_interval_steps:
                self._log_table(step)

    def on_close(self, state: StepState, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        if self.event_count != self.table_rows:
            self._log_table(state.step)
        self.run.summary.update({
            "status": summary["status"], "final_loss": summary["final_loss"],
            "final_step": summary["steps"], EVENTS_KEY: self.event_count,
            "alerts_sent": self.alerts_sent, "alerts_suppressed": self.alerts_suppressed,
            # The run's throughput (stability/throughput.py), as in summary.json.
            **{f"perf/run_{k}": summary[k] for k in ("tokens_per_s", "model_flops_per_s",
                                                     "mfu") if k in summary},
        })
        ok = summary["status"] in ("completed", "stopped", "preempted")
        self.run.finish(exit_code=0 if ok else 1)
        self.run = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "events": list(self.events), "event_count": self.event_count,
            "last_alert": dict(self.last_alert), "alerts_sent": self.alerts_sent,
            "alerts_suppressed": self.alerts_suppressed, "table_step": self.table_step,
            "table_rows": self.table_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id
        self.events = list(state.get("events", []))
        self.event_count = state.get("event_count", len(self.events))
        self.last_alert = dict(state.get("last_alert", {}))
        self.alerts_sent = state.get("alerts_sent", 0)
        self.alerts_suppressed = state.get("alerts_suppressed", 0)
        self.table_step = state.get("table_step")
        self.table_rows = state.get("table_rows", 0)
        self.pending = []  # the restored events start this process's table (_log_table)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _row(event: dict[str, Any]) -> dict[str, Any]:
        """An events.jsonl row with the table's column types (int step, floats, strings)."""
        row = {c: str(event.get(c, "")) for c in TABLE_COLUMNS}
        row["step"] = int(event.get("step", 0))
        for key in ("value", "threshold", "score"):
            row[key] = _float(event.get(key))
        return row

    def _log_table(self, step: int) -> None:
        """Log the events table's new rows. The table is incremental: each log uploads only the
        rows added since the last one. A resumed process starts a new table, whose first log
        carries every event the checkpoint kept."""
        if self.table is None:
            self.table = wandb.Table(columns=list(TABLE_COLUMNS), log_mode="INCREMENTAL")
            new = self.events
        else:
            new = self.pending
        for row in new:
            self.table.add_data(*(row[c] for c in TABLE_COLUMNS))
        self.pending = []
        self.run.log({STEP_KEY: step, TABLE_KEY: self.table})
        self.table_step = step
        self.table_rows = self.event_count

    def _alert(self, step: int, incident: list[dict[str, Any]]) -> None:
        """Send at most one alert for the events of one step, within the throttle."""
        alertable = [e for e in incident if e.get("action") != "log"]
        if not alertable:
            return
        interval = self.cfg.alert_min_interval_steps
        due = [e for e in alertable
               if e.get("severity") == "error"
               or step - self.last_alert.get(self._key(e), -interval) >= interval]
        if not due or self.alerts_sent >= self.cfg.max_alerts:
            self.alerts_suppressed += 1
            return
        lead = max(due, key=lambda e: (e.get("severity") == "error",
                                       _finite_or(_float(e.get("score")), -math.inf)))
        for event in alertable:
            self.last_alert[self._key(event)] = step
        self.alerts_sent += 1
        error = any(e.get("severity") == "error" for e in due)
        self.run.alert(title=alert_title(lead, step),
                       text=self._text(step, lead, incident),
                       level=wandb.AlertLevel.ERROR if error else wandb.AlertLevel.WARN,
                       wait_duration=ALERT_WAIT_SECONDS)

    @staticmethod
    def _key(event: dict[str, Any]) -> str:
        return f"{event.get('detector', '')}|{event.get('metric', '')}"

    def _text(self, step: int, lead: dict[str, Any], incident: list[dict[str, Any]]) -> str:
        name = self.run.name if self.run is not None else ""
        lines = [
            f"run: {name} ({self.run_dir.resolve()})",
            f"step: {step}",
            f"metric: {lead.get('metric')} = {_fmt(_float(lead.get('value')))} "
            f"(threshold {_fmt(_float(lead.get('threshold')))}, "
            f"score {_fmt(_float(lead.get('score')))})",
            f"detector: {lead.get('detector')} ({lead.get('kind', 'spike')}, "
            f"{lead.get('severity', 'warn')})",
            f"action: {lead.get('action') or 'none'}",
        ]
        if lead.get("message"):
            lines.append(str(lead["message"]))
        for other in incident:
            if other is not lead:
                lines.append(f"also: {other.get('detector')} on {other.get('metric')} = "
                             f"{_fmt(_float(other.get('value')))} "
                             f"(threshold {_fmt(_float(other.get('threshold')))}, "
                             f"action {other.get('action') or 'none'})")
        if self.alerts_suppressed:
            lines.append(f"incidents not alerted so far (throttled): {self.alerts_suppressed}")
        if self.alerts_sent >= self.cfg.max_alerts:
            lines.append(f"alert limit reached ({self.cfg.max_alerts}); later events only go to "
                         f"the {TABLE_KEY} table and events.jsonl")
        return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing or unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def new_run_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, like W&B's own."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def alert_title(event: dict[str, Any], step: int) -> str:
    """``loss spike at step 123``, ``non-finite loss at step 7``, ``attn_logit_max rising at
    step 40``: under 64 characters (a long metric name is shortened, the step is kept)."""
    kind = event.get("kind", "spike")
    metric = str(event.get("metric", "metric"))
    template = TITLES.get(kind, TITLES["spike"])
    room = TITLE_MAX - len(template.format(metric="", step=step))
    if len(metric) > room:
        metric = metric[:max(room - 3, 1)] + "..."
    return template.format(metric=metric, step=step)[:TITLE_MAX]
