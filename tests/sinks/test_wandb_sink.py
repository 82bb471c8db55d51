"""The W&B sink, driven directly through its hooks; its offline run file is read back."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import wandb_records as wr

from stability.callbacks import Control, Flush
from stability.errors import ConfigError
from stability.sinks.config import WANDB_ENV, RunLabels, WandbConfig
from stability.sinks.wandb import (
    EVENTS_KEY,
    TABLE_COLUMNS,
    TABLE_KEY,
    WandbSink,
    alert_title,
    wandb_name,
)

STEPS = 10
LOSSES = [10.0 - 0.5 * s for s in range(1, STEPS + 1)]
LOSSES[6] = math.nan  # step 7: non-finite loss


def rows(first: int, last: int) -> list[dict]:
    return [{"step": s, "loss": LOSSES[s - 1] if s <= STEPS else 4.0, "grad_norm": 1.0 + s,
             "lr": 1e-3, "tokens": 1024 * s, "z_loss": 0.01, "attn_logit_max": 5.0,
             "grad_norm/layer_1": 0.5, "logsumexp_mean": math.inf if s == 7 else 3.0,
             "time": 0.1 * s, "step_time": 0.1, "tokens_per_s": 1e4, "mystery": s,
             "note": "not a number", "mfu": None}
            for s in range(first, last + 1)]


def event(step, detector="loss_spike", metric="loss", value=9.0, threshold=5.0, score=8.0,
          severity="warn", kind="spike", action="alert") -> dict:
    return {"step": step, "detector": detector, "metric": metric, "value": value,
            "threshold": threshold, "score": score, "severity": severity, "kind": kind,
            "action": action, "message": f"{metric}={value} at step {step}"}


# The scenario, with alert_min_interval_steps=50 and max_alerts=20:
EVENTS = [
    [event(3)],                                        # alert 1 (WARN)
    [event(4, value=9.5), event(5, value=9.2)],        # same (detector, metric): throttled x2
    [event(6, detector="attn_logit_growth", metric="attn_logit_max", kind="leading",
           action="log")],                             # the policy said "log": no alert
    [event(7, detector="nonfinite", metric="loss", value=math.nan, threshold=math.nan,
           score=math.inf, severity="error", kind="nonfinite", action="stop"),
     event(7, detector="nonfinite", metric="grad_norm", value=math.inf, threshold=math.nan,
           score=math.inf, severity="error", kind="nonfinite", action="stop")],
    # ^ error: bypasses the interval; two events at one step = one incident = alert 2 (ERROR)
]
LATE_EVENT = event(60)                                 # the interval has passed: alert 3


def summary(step: int, loss: float) -> dict:
    return {"status": "completed", "steps": step, "final_loss": loss, "tokens_per_s": 1e4}


@pytest.fixture(scope="module")
def offline_run(offline_env, tmp_path_factory, make_state, tiny_config):
    """Drive one sink through a run (then resume it), return what it left on disk."""
    run_dir = tmp_path_factory.mktemp("run") / "llama2-tiny"
    run_dir.mkdir()
    state = make_state()
    cfg = WandbConfig(mode="offline", project="stability-test", tags=["test"],
                      alert_min_interval_steps=50, max_alerts=20, table_interval_steps=100)
    config = dataclasses.asdict(tiny_config)
    sink = WandbSink(cfg, run_dir, config)
    sink.on_train_start(state)
    sink.on_restore(state, "resume")
    done = 0
    for batch in EVENTS:  # as the loop does: a flush's rows with the events found in them
        state.step = batch[-1]["step"]
        sink.on_metrics(state, Flush(rows(done + 1, state.step), batch), Control())
        done = state.step
    state.step = STEPS
    sink.on_metrics(state, Flush(rows(8, STEPS)), Control())
    state.step = 60
    sink.on_metrics(state, Flush(rows(60, 60), [LATE_EVENT]), Control())
    saved = sink.state_dict()
    sink.on_close(state, summary(60, 4.0))
    first = sorted((run_dir / "wandb").glob("offline-run-*"))

    # A resumed process: the checkpoint's state brings the W&B run id back.
    resumed = WandbSink(cfg, run_dir, config)
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    resumed.on_train_start(state)
    resumed.on_restore(state, "resume")
    resumed.on_metrics(state, Flush(rows(61, 62)), Control())
    resumed.on_close(state, summary(62, 4.0))
    second = [p for p in sorted((run_dir / "wandb").glob("offline-run-*")) if p not in first]
    assert len(first) == 1 and len(second) == 1
    records = wr.read_finished(next(first[0].glob("run-*.wandb")))
    return {"sink": sink, "resumed": resumed, "run_dir": run_dir, "dir": first[0],
            "records": records, "second": wr.read_finished(next(second[0].glob("run-*.wandb")))}


def test_history_holds_the_metrics_under_stable_names(offline_run):
    history = [h for h in wr.history(offline_run["records"]) if "train/loss" in h]
    logged = {h["step"]: h["train/loss"] for h in history}
    assert sorted(logged) == [*range(1, STEPS + 1), 60]
    for step, loss in logged.items():
        expected = LOSSES[step - 1] if step <= STEPS else 4.0
        assert (math.isnan(loss) and math.isnan(expected)) or loss == expected, step
    row = next(h for h in history if h["step"] == 7)
    assert row["spike/logsumexp_mean"] == math.inf  # non-finite values are logged, not dropped
    assert row["train/grad_norm"] == 8.0 and row["spike/grad_norm/layer_1"] == 0.5
    assert row["perf/step_time"] == 0.1 and row["other/mystery"] == 7
    assert not any(k.endswith(("note", "mfu")) for k in row)  # strings and None are skipped
    assert row[EVENTS_KEY] == 6  # events up to step 7, logged with the step's metrics


def test_one_alert_per_incident_throttled(offline_run):
    alerts = wr.alerts(offline_run["records"])
    assert [(a["title"], a["level"]) for a in alerts] == [
        ("loss spike at step 3", "WARN"),
        ("non-finite loss at step 7", "ERROR"),
        ("loss spike at step 60", "WARN"),
    ]
    for alert in alerts:
        assert len(alert["title"]) < 64
        assert int(alert["wait_duration"]) == 60_000
    text = alerts[0]["text"]
    for part in ("run: llama2-tiny", str(offline_run["run_dir"]), "step: 3",
                 "metric: loss = 9", "threshold 5", "detector: loss_spike", "action: alert"):
        assert part in text, part
    assert "also: nonfinite on grad_norm = inf" in alerts[1]["text"]
    assert "incidents not alerted so far (throttled): 2" in alerts[1]["text"]
    sink = offline_run["sink"]
    assert (sink.alerts_sent, sink.alerts_suppressed, sink.event_count) == (3, 2, 7)


def test_events_table_markers_and_summary(offline_run):
    history = wr.history(offline_run["records"])
    markers = {h["step"]: h for h in history if any(k.startswith("spike/marker/") for k in h)}
    assert sorted(markers) == [3, 4, 5, 6, 7, 60]
    assert markers[3]["spike/marker/loss"] == 9.0
    assert math.isnan(markers[7]["spike/marker/loss"])
    assert markers[7]["spike/marker/grad_norm"] == math.inf

    # An incremental table: each log uploads only the events since the previous one.
    increments = table_increments(offline_run["dir"])
    assert [[r[0] for r in t["data"]] for t in increments] == [[3], [4, 5, 6, 7, 7, 60]]
    assert all(t["columns"] == list(TABLE_COLUMNS) for t in increments)
    assert [r[6] for t in increments for r in t["data"]].count("error") == 2
    logged = [h[TABLE_KEY] for h in history if TABLE_KEY in h]
    assert [(t["_type"], t["increment_num"], t["nrows"]) for t in logged] == [
        ("incremental-table-file", 0, 1), ("incremental-table-file", 1, 7)]
    assert logged[1]["previous_increments_paths"] == [logged[0]["artifact_path"]]

    summary = wr.summary(offline_run["records"])
    assert summary["status"] == "completed" and summary["final_loss"] == 4.0
    assert summary["perf/run_tokens_per_s"] == 1e4
    assert summary["alerts_sent"] == 3 and summary["alerts_suppressed"] == 2
    assert summary[TABLE_KEY]["nrows"] == 7


def table_increments(wandb_run_dir) -> list[dict]:
    """The events table files of one W&B run segment, in the order they were logged."""
    paths = (wandb_run_dir / "files" / "media" / "table").rglob("*.table.json")
    step = {p: int(p.name.split("_")[-2]) for p in paths}  # events_table_<seq>_<hash>.table.json
    return [json.loads(p.read_text(), parse_constant=float) for p in sorted(step, key=step.get)]


def test_run_config_name_and_id(offline_run, tiny_config):
    run = wr.run_info(offline_run["records"])
    assert run.run_id == offline_run["sink"].run_id
    assert run.display_name == "llama2-tiny" and run.project == "stability-test"
    assert list(run.tags) == ["test", "llama2", "tiny"]  # the config's, then recipe and size
    assert run.job_type == "train" and run.run_group == ""
    stored = json.loads((offline_run["run_dir"] / "wandb_run.json").read_text())
    assert stored == {"id": run.run_id, "name": "llama2-tiny", "group": None,
                      "job_type": "train"}
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    config.pop("_wandb", None)
    assert config == json.loads(json.dumps(dataclasses.asdict(tiny_config)))  # the whole config


def test_resume_continues_the_same_run(offline_run):
    run = wr.run_info(offline_run["second"])
    assert run.run_id == offline_run["sink"].run_id and run.resume
    assert [h["step"] for h in wr.history(offline_run["second"]) if "train/loss" in h] == [61, 62]
    resumed = offline_run["resumed"]
    assert resumed.event_count == 7 and resumed.alerts_sent == 3 and len(resumed.events) == 7
    # The checkpoint was taken before the table's last log: the resumed process starts its own
    # incremental table, with every event the checkpoint kept.
    second = sorted(p for p in (offline_run["run_dir"] / "wandb").glob("offline-run-*")
                    if p != offline_run["dir"])
    assert [[r[0] for r in t["data"]] for t in table_increments(second[0])] == [
        [3, 4, 5, 6, 7, 7, 60]]


# ---------------------------------------------------------------------- without W&B


class FakeRun:
    name = "fake"

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        self.logged: list[dict] = []

    def alert(self, **kwargs) -> None:
        self.alerts.append(kwargs)

    def log(self, data: dict) -> None:
        self.logged.append(data)


def fake_sink(tmp_path, make_state, **cfg) -> tuple[WandbSink, FakeRun, object]:
    sink = WandbSink(WandbConfig(mode="offline", **cfg), tmp_path, {})
    sink.run = FakeRun()
    return sink, sink.run, make_state()


def events(sink, state, found: list[dict]) -> None:
    """A flush of one row per step of ``found``, with those events."""
    steps = sorted({e["step"] for e in found})
    state.step = steps[-1]
    sink.on_metrics(state, Flush([{"step": s, "loss": 1.0} for s in steps], found), Control())


def test_max_alerts_caps_even_errors(tmp_path, make_state):
    sink, run, state = fake_sink(tmp_path, make_state, max_alerts=2)
    for step in range(1, 6):
        events(sink, state, [event(step, detector="nonfinite", severity="error",
                                   kind="nonfinite", action="stop")])
    assert len(run.alerts) == 2 and sink.alerts_suppressed == 3
    assert "alert limit reached (2)" in run.alerts[-1]["text"]


def test_interval_is_per_detector_and_metric(tmp_path, make_state):
    sink, run, state = fake_sink(tmp_path, make_state, alert_min_interval_steps=10)
    for step in range(1, 25):
        events(sink, state, [event(step), event(step, detector="grad_norm_spike",
                                                metric="grad_norm")])
    assert [a["title"] for a in run.alerts] == [
        "loss spike at step 1", "loss spike at step 11", "loss spike at step 21"]
    assert sink.alerts_suppressed == 21


def test_log_action_never_alerts(tmp_path, make_state):
    sink, run, state = fake_sink(tmp_path, make_state)
    events(sink, state, [event(5, action="log"), event(5, metric="grad_norm", action="log")])
    assert run.alerts == [] and sink.alerts_suppressed == 0 and sink.event_count == 2


class FakeTable:
    """wandb.Table in incremental mode as the sink uses it: rows are added to one table, and
    each log of it uploads the rows added since the previous log."""

    def __init__(self, columns, log_mode) -> None:
        assert log_mode == "INCREMENTAL"
        self.rows: list[tuple] = []

    def add_data(self, *row) -> None:
        self.rows.append(row)


def test_table_logs_its_new_rows_at_most_every_interval(tmp_path, make_state, monkeypatch):
    monkeypatch.setattr("stability.sinks.wandb.wandb.Table", FakeTable)
    sink, run, state = fake_sink(tmp_path, make_state, table_interval_steps=20,
                                 alert_min_interval_steps=0)
    uploaded = []  # (step, rows uploaded by this log of the table)

    def log(data: dict) -> None:
        if TABLE_KEY in data:
            done = sum(len(rows) for _, rows in uploaded)
            uploaded.append((data["step"], [r[0] for r in data[TABLE_KEY].rows[done:]]))
        run.logged.append(data)

    run.log = log
    for step in (1, 5, 21, 30, 41):
        events(sink, state, [event(step)])
    assert uploaded == [(1, [1]), (21, [5, 21]), (41, [30, 41])]
    assert len({id(d[TABLE_KEY]) for d in run.logged if TABLE_KEY in d}) == 1  # one table


def test_rollback_does_not_rewind_a_live_run():
    # W&B has already seen (and alerted on) what came after the checkpoint: a rollback
    # restores the callbacks' state from it, except this one's.
    assert WandbSink.restore_on_rollback is False


def test_events_reach_wandb_with_the_row_they_came_from(tmp_path, make_state):
    sink, run, state = fake_sink(tmp_path, make_state, alert_min_interval_steps=0)
    sink.on_metrics(state, Flush([{"step": 4, "loss": 2.0}, {"step": 5, "loss": 9.0}],
                                 [event(5)]), Control())
    assert [(d["step"], d.get("train/loss"), d.get("spike/marker/loss"), d[EVENTS_KEY])
            for d in run.logged if "step" in d and TABLE_KEY not in d] == [
        (4, 2.0, None, 0), (5, 9.0, 9.0, 1)]


@pytest.mark.parametrize("key, name", [
    ("loss", "train/loss"), ("grad_norm", "train/grad_norm"), ("lr", "train/lr"),
    ("tokens", "train/tokens"), ("z_loss", "train/z_loss"), ("step", "step"),
    ("eval_loss", "train/eval_loss"),
    ("logsumexp_mean", "spike/logsumexp_mean"), ("logit_max_abs", "spike/logit_max_abs"),
    ("attn_logit_max", "spike/attn_logit_max"), ("update_ratio_max", "spike/update_ratio_max"),
    ("embedding_std", "spike/embedding_std"), ("adam_v_below_eps", "spike/adam_v_below_eps"),
    ("spike_score", "spike/spike_score"), ("skipped", "spike/skipped"),
    ("grad_norm/layer_3", "spike/grad_norm/layer_3"),
    ("attn_logit_max/layer_1", "spike/attn_logit_max/layer_1"),
    ("update_ratio/layer_2", "spike/update_ratio/layer_2"),
    ("tokens_per_s", "perf/tokens_per_s"), ("step_time", "perf/step_time"),
    ("mfu", "perf/mfu"), ("time", "perf/time"),
    ("something_new", "other/something_new"), ("loss_scale/x", "other/loss_scale/x"),
])
def test_wandb_name(key, name):
    assert wandb_name(key) == name


def test_alert_titles_stay_under_64_characters():
    assert alert_title(event(123), 123) == "loss spike at step 123"
    assert alert_title(event(7, kind="nonfinite"), 7) == "non-finite loss at step 7"
    assert alert_title(event(40, metric="attn_logit_max", kind="leading"), 40) == \
        "attn_logit_max rising at step 40"
    long = alert_title(event(1, metric="attn_logit_max/" + "x" * 80), 12345678)
    assert len(long) < 64 and long.endswith("... spike at step 12345678")


# ---------------------------------------------------------------------- the run's identity
class FakeInit:
    """``wandb.init`` without W&B: records its arguments."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs) -> FakeRun:
        self.calls.append(kwargs)
        run = FakeRun()
        run.define_metric = lambda *args, **kw: None
        return run


@pytest.fixture
def fake_init(monkeypatch):
    for var in WANDB_ENV.values():
        monkeypatch.delenv(var, raising=False)
    init = FakeInit()
    monkeypatch.setattr("stability.sinks.wandb.wandb.init", init)
    return init


CONFIG = {"recipe": "gpt", "size": "tiny"}
LABELS = RunLabels(name="gpt-tiny/optim.lr=0.01,trainer.seed=1", group="qk_norm")


def test_init_gets_the_launch_names_and_the_standard_environment(tmp_path, make_state,
                                                                 fake_init, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    WandbSink(WandbConfig(tags=["mine", "gpt"]), tmp_path, CONFIG, LABELS).on_restore(
        make_state(), "resume")
    call = fake_init.calls[0]
    assert {k: call[k] for k in ("mode", "project", "entity", "name", "group", "job_type",
                                 "tags")} == {
        "mode": "online", "project": "env-project", "entity": "env-team",
        "name": "gpt-tiny/optim.lr=0.01,trainer.seed=1", "group": "qk_norm",
        "job_type": "train", "tags": ["mine", "gpt", "tiny"]}


def test_the_config_wins_over_the_environment_and_the_launch(tmp_path, make_state, fake_init,
                                                             monkeypatch):
    for key, var in WANDB_ENV.items():
        monkeypatch.setenv(var, "online" if key == "mode" else f"env-{key}")
    cfg = WandbConfig(mode="offline", project="p", entity="e", name="n", group="g",
                      job_type="eval")
    WandbSink(cfg, tmp_path, CONFIG, LABELS).on_restore(make_state(), "resume")
    call = fake_init.calls[0]
    assert [call[k] for k in WANDB_ENV] == ["offline", "p", "e", "n", "g", "eval"]
    # unset in the config: W&B's variables win over the launch's labels and our defaults
    WandbSink(WandbConfig(), tmp_path / "other", CONFIG, LABELS).on_restore(make_state(),
                                                                           "resume")
    call = fake_init.calls[1]
    assert [call[k] for k in WANDB_ENV] == ["online", "env-project", "env-entity", "env-name",
                                            "env-group", "env-job_type"]


def test_nothing_set_anywhere_gives_our_defaults(tmp_path, fake_init):
    assert WandbConfig().resolved_mode(env={}) == "disabled"
    assert WandbConfig().resolved("project", env={}) == "stability"
    assert WandbConfig().resolved("entity", env={}) is None
    assert WandbConfig().resolved_mode(env={"WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        WandbConfig().resolved_mode(env={"WANDB_MODE": "sometimes"})


def test_a_restart_before_any_checkpoint_continues_the_same_wandb_run(tmp_path, make_state,
                                                                       fake_init):
    """The id is fixed at the first start in wandb_run.json: a process that crashed before its
    first checkpoint (no sink state to load) is continued, with the name and group it had."""
    WandbSink(WandbConfig(), tmp_path, CONFIG, LABELS).on_restore(make_state(), "resume")
    stored = json.loads((tmp_path / "wandb_run.json").read_text())
    again = WandbSink(WandbConfig(), tmp_path, CONFIG, RunLabels(name="rerun", group=None))
    again.on_restore(make_state(), "resume")  # e.g. the same job rerun as a single run
    first, second = fake_init.calls
    assert second["id"] == first["id"] == stored["id"] and second["resume"] == "allow"
    assert (second["name"], second["group"]) == (LABELS.name, LABELS.group)
    renamed = WandbSink(WandbConfig(name="explicit"), tmp_path, CONFIG, LABELS)
    renamed.on_restore(make_state(), "resume")  # a name given in the config is applied
    assert fake_init.calls[2]["id"] == stored["id"] and fake_init.calls[2]["name"] == "explicit"


def labels(task: list[str], mode: str = "RunMode.MULTIRUN", dirname: str = "optim.lr=0.01"):
    """``labels_from_hydra`` of a GPT tiny job with these task overrides (no Hydra run)."""
    from omegaconf import OmegaConf

    from stability.config import Config
    from stability.train import labels_from_hydra

    hydra_cfg = OmegaConf.create({"overrides": {"task": task}, "mode": mode,
                                  "sweep": {"dir": "runs/multirun/2026-12-01_10-00-00"},
                                  "job": {"override_dirname": dirname}})
    return labels_from_hydra(hydra_cfg, Config(recipe="gpt", size="tiny"))


def test_labels_name_the_run_after_its_overrides_and_group_it_by_study():
    assert labels(["+sweep=qk_norm", "optim.lr=0.01"]) == RunLabels(
        "gpt-tiny/optim.lr=0.01", "qk_norm")
    assert labels(["optim.lr=0.01"]) == RunLabels("gpt-tiny/optim.lr=0.01",
                                                  "2026-12-01_10-00-00")
    assert labels([], mode="RunMode.RUN", dirname="") == RunLabels("gpt-tiny", None)


@pytest.mark.parametrize("field, value", [("alert_min_interval_steps", -1),
                                          ("max_alerts", -2), ("table_interval_steps", 0)])
def test_bad_config_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=f"logger.wandb.{field}"):
        WandbConfig(mode="offline", **{field: value}).validate()
