"""`slurm_cluster`: a real single-node SLURM cluster on loopback, from `scripts/local-slurm`.

Use it in any test that needs SLURM, and mark the test `slurm`:

    pytestmark = pytest.mark.slurm

    def test_something(slurm_cluster):
        subprocess.run(["sbatch", "--wait", "--wrap", "true"], check=True)

The fixture is session-scoped: the first test that asks for it runs `scripts/local-slurm up`
(about 3 s with the Debian packages installed, about 30 s more to install them), sets
`SLURM_CONF` in `os.environ` (so `sbatch`, submitit and Hydra's launcher find the cluster) and,
at the end of the session, runs `scripts/local-slurm down` if, and only if, a test session brought
the cluster up; when several pytest sessions share the cluster, the last one to finish stops it
(a shared lock on `<state dir>/users.lock`). Set `STABILITY_SLURM_KEEP=1` to leave it up for the
next session, and `STABILITY_SLURM_STATE=DIR` to use another state dir.

Where the machine cannot run the cluster (not root, no apt-get, packages not installable) the
tests skip with that reason. Any other failure of `up` fails the tests: it is a bug to fix.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "local-slurm"
EXIT_UNSUPPORTED = 3  # scripts/local-slurm: this machine cannot run the cluster
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
_skip_reason: list[str] = []


@dataclass(frozen=True)
class SlurmCluster:
    """The running cluster.

    Attributes:
        state_dir: configs, logs (`log/`), pids and databases of the cluster.
        slurm_conf: the generated slurm.conf (also in `os.environ["SLURM_CONF"]`).
        partition: the default partition.
        urgent_partition: a partition whose jobs preempt (requeue) jobs of `partition`.
        brought_up: whether this session started the cluster (and will stop it).
    """

    state_dir: Path
    slurm_conf: Path
    partition: str = "debug"
    urgent_partition: str = "urgent"
    brought_up: bool = False

    def final_state(self, job_id: str, timeout: float = 20) -> tuple[str, str]:
        """(State, ExitCode) of a job's allocation in `sacct` once final (accounting lags the
        job's end by a moment), e.g. ("COMPLETED", "0:0"); the last run of a requeued job."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            if out:
                state, code = out.splitlines()[-1].split("|")
                if state.split()[0] in FINAL_STATES:
                    return state.split()[0], code
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not final in sacct after {timeout} s: {out!r}")

    def log(self, daemon: str) -> str:
        """The log of `daemon` (slurmctld, slurmd, slurmdbd, munged, mariadbd), for messages."""
        path = self.state_dir / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _state_dir() -> Path:
    return Path(os.environ.get("STABILITY_SLURM_STATE", "/tmp/stability-slurm"))


def _cannot_run() -> str | None:
    """Why this machine cannot run the cluster, when that is known without trying."""
    if os.geteuid() != 0:
        return "local SLURM needs root (scripts/local-slurm starts daemons and uses apt-get)"
    if not any(Path(d, "slurmctld").exists() for d in ("/usr/sbin", "/sbin")) and not any(
        Path(d, "apt-get").exists() for d in ("/usr/bin", "/bin")
    ):
        return "local SLURM needs the Debian SLURM packages or apt-get to install them"
    return None


def _script(command: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), command, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Bring up the local SLURM cluster for the session (see the module docstring)."""
    reason = _cannot_run()
    if reason:
        _skip_reason.append(reason)
        pytest.skip(reason)
    state_dir = _state_dir().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # Every session using the cluster holds a shared lock on this file; `down` needs it
    # exclusively, so a session never stops the cluster under another one (e.g. two pytest runs).
    users = open(state_dir / "users.lock", "w")  # noqa: SIM115 (held for the whole session)
    fcntl.flock(users, fcntl.LOCK_SH)
    try:
        proc = _script("up", state_dir, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scripts/local-slurm up did not finish in 900 s:\n{e.stderr}")
    if proc.returncode == EXIT_UNSUPPORTED:
        why = proc.stderr.partition("cannot run here: ")[2] or proc.stderr or "unsupported"
        reason = "local SLURM cannot run here: " + " ".join(why.split())[:300]
        _skip_reason.append(reason)
        pytest.skip(reason)
    if proc.returncode != 0:
        if "] started " in proc.stderr:  # stop what this failed attempt started
            _script("down", state_dir, timeout=120)
        pytest.fail(f"scripts/local-slurm up failed ({proc.returncode}):\n{proc.stderr}")
    brought_up = "already up" not in proc.stderr
    pending = state_dir / "down-pending"  # an owner left the cluster up for another session
    if brought_up and os.environ.get("STABILITY_SLURM_KEEP") != "1":
        pending.touch()
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state_dir / "slurm.conf")
    try:
        yield SlurmCluster(state_dir, state_dir / "slurm.conf", brought_up=brought_up)
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        try:  # the last session out stops the cluster, if a session of ours brought it up
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if pending.exists():
                _script("down", state_dir, timeout=120)
                pending.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # another session still uses it; it stops the cluster when it ends
        users.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say why the SLURM tests skipped, also when pytest runs without `-rs`."""
    if _skip_reason and not set("sa") & set(config.option.reportchars or ""):
        terminalreporter.write_line(f"SLURM tests skipped: {_skip_reason[0]}", yellow=True)
