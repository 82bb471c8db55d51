"""The shape of the loop, checked: a short Trainer, callbacks that see only the step state, no
hook inside another hook, no import cycle, the device decided in one place."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from helpers import REPO, make_config, make_trainer

from stability import trainer as trainer_module
from stability.callbacks import Callback
from stability.train import default_callbacks
from stability.trainer import Trainer

PACKAGE = REPO / "stability"


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, name: str) -> set[str]:
    """The stability modules ``path`` (module ``name``) imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("stability") and m != name}


def test_no_import_cycle_among_stability_modules():
    known = modules()
    graph = {name: {m for m in imports_of(path, name) if m in known}
             for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                # A package imports its own submodules by design; any other loop is a cycle.
                loop = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                assert all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in
                           zip(loop, loop[1:])), " -> ".join(loop)
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_command_line_builds_a_trainer():
    users = {name for name, path in modules().items() if "stability.trainer" in
             imports_of(path, name)}
    assert users == {"stability.train"}  # callbacks never see the Trainer


def test_the_trainer_class_is_short():
    lines, _ = inspect.getsourcelines(Trainer)
    assert len(lines) <= 250, len(lines)


def test_every_hook_the_loop_calls_is_declared_on_callback():
    source = Path(trainer_module.__file__).read_text()
    called = set(re.findall(r'_call\("(\w+)"', source))
    called |= set(re.findall(r"callback\.(on_\w+)\(", source))
    assert called and all(callable(getattr(Callback, hook, None)) for hook in called), called
    declared = {n for n, v in vars(Callback).items() if n.startswith(("on_", "before_"))}
    assert called == declared  # and nothing declared goes uncalled


def test_the_device_is_decided_in_one_place():
    deciding = {name for name, path in modules().items()
                if "cuda.is_available" in path.read_text()}
    assert deciding == {"stability.runtime"}


@pytest.mark.slow
def test_no_hook_round_runs_inside_another_through_a_rollback(tmp_path, single_process,
                                                              monkeypatch):
    depth, calls = [0], []
    original = Trainer._call

    def guarded(self, hook, *args):
        assert depth[0] == 0, f"{hook} called inside another hook round"
        depth[0] += 1
        calls.append(hook)
        try:
            original(self, hook, *args)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(Trainer, "_call", guarded)
    cfg = make_config("size=tiny", "recipe=llama2", "optim.lr=3e-3", "trainer.train_steps=70",
                      "fault.at_step=50", "fault.kind=lr_spike", "fault.magnitude=300",
                      "actions.on_spike=rollback", "actions.rollback_skip_batches=5",
                      "checkpoint.interval=10", "checkpoint.keep_last=4",
                      "logger.console=false")
    trainer = make_trainer(cfg, tmp_path, default_callbacks(cfg, tmp_path, True),
                           single_process)
    summary = trainer.fit()
    assert summary["rollbacks"] >= 1 and "on_restore" in calls[2:]  # a rollback happened
    assert calls[-1] == "on_close"
