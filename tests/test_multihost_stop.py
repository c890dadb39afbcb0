"""Multi-host stop sync of the training loop: two processes (jax.distributed on localhost, CPU,
gloo), a SIGTERM to one of them, a time budget spent on the other, resume, exact continuation.

Each process must stop and save at the same step, or one waits forever in a collective the other
never enters (train/loop.py all-gathers the stop flags after every step). The workers
(tests/multihost_loop_worker.py) run the real `train_and_evaluate` four times in a row:
SIGTERM to process 1 only during step 2 -> both stop after step 2 and write one checkpoint
together; resume with a time budget that only process 0 has -> both stop after step 3; resume
to the end (step 4); an uninterrupted run from scratch, whose losses and final parameters the
interrupted one must equal exactly.

A per-process stop decision fails this test: with the workers' `--local_stop` sabotage,
process 1 stops and saves after step 2 while process 0 goes on into step 3, and the
checkpoint's collectives meet the train step's (observed: gloo aborts process 1 with a
"collective mismatch" as its save starts, process 0 dies a minute later when process 1's
heartbeats stop; the fixture fails at the first non-zero exit, a hang would hit STOP_TIMEOUT).

Run time: one launch of the two workers, ~95 s on an idle 2-core CPU machine (~60 s of it
compiling the train step), up to ~140 s under load.
"""

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from test_distributed import launch_processes
from test_train_loop import _losses

REPO = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(REPO / "tests" / "multihost_loop_worker.py")]
NUM_STEPS, STOP_AT = 4, 2   # as in the worker
STARTUP_TIMEOUT = 900       # until process 1 is in step STOP_AT (imports, data, compilation)
STOP_TIMEOUT = 180          # from the SIGTERM until both processes finished the sigterm phase
TOTAL_TIMEOUT = 600         # from the SIGTERM until both processes exited


def _tails(logs):
  return "\n".join(f"--- {log}\n{Path(log).read_text()[-3000:]}" for log in logs)


def _kill_and_fail(procs, logs, why):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()
  pytest.fail(f"{why} (returncodes {[p.returncode for p in procs]}):\n{_tails(logs)}")


def _wait_until(predicate, procs, logs, timeout, why):
  deadline = time.time() + timeout
  while not predicate():
    if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
      _kill_and_fail(procs, logs, why)
    time.sleep(0.05)


def _sigterm_phase_done(logs):
  return all('"phase": "sigterm"' in Path(log).read_text() for log in logs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Both workers through all four phases; SIGTERM to process 1 when it asks for it."""
  out = tmp_path_factory.mktemp("multihost_stop")
  start = time.time()
  procs, logs = launch_processes(
      lambda i, coordinator: WORKER + ["--out", str(out), "--coordinator", coordinator,
                                       "--process_id", str(i)],
      out, num_devices=1)
  try:
    _wait_until((out / "ready_for_sigterm").exists, procs, logs, STARTUP_TIMEOUT,
                "process 1 never reached the step where it gets SIGTERM")
    signalled = time.time()
    procs[1].send_signal(signal.SIGTERM)
    _wait_until(lambda: _sigterm_phase_done(logs), procs, logs, STOP_TIMEOUT,
                "the processes did not both stop after the SIGTERM (deadlock?)")
    stop_seconds = time.time() - signalled
    _wait_until(lambda: all(p.poll() is not None for p in procs), procs, logs, TOTAL_TIMEOUT,
                "the workers did not finish")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if any(p.returncode != 0 for p in procs):
    pytest.fail(f"worker failed (returncodes {[p.returncode for p in procs]}):\n{_tails(logs)}")
  print(f"two-process stop/resume run: {time.time() - start:.0f}s, "
        f"SIGTERM -> both stopped: {stop_seconds:.1f}s")
  records = [json.loads((out / f"phases_p{i}.json").read_text()) for i in range(2)]
  phases = [{r["phase"]: r for r in rec["phases"]} for rec in records]
  return dict(out=out, records=records, phases=phases)


def test_sigterm_to_one_process_stops_both_at_the_same_step(run):
  p0, p1 = (ph["sigterm"] for ph in run["phases"])
  # Only process 1 got the signal ...
  assert p0["sigterms_handled"] == 0 and p1["sigterms_handled"] == 1, (p0, p1)
  # ... and both stopped right after the step it arrived in, as a preemption.
  for r in (p0, p1):
    assert r["process_count"] == 2
    assert r["latest_before"] is None
    assert r["step"] == r["state_step"] == STOP_AT, r
    assert r["preempted"] is True, r
    assert r["checkpoints_after"] == [STOP_AT], r
    assert not r["model_written"], r   # a preempted run writes no final model
  # One checkpoint of that step, written by both processes together, with both input positions.
  workdir = run["out"] / "run"
  ckpt = workdir / "checkpoints" / str(STOP_AT)
  assert (ckpt / "commit_success.txt").exists()
  assert (ckpt / "state" / "ocdbt.process_0").is_dir()
  assert (ckpt / "state" / "ocdbt.process_1").is_dir()
  for host in (0, 1):
    assert list((workdir / "input" / str(STOP_AT)).glob(f"host{host}*")), host


def test_time_budget_on_one_process_stops_both_at_the_same_step(run):
  for ph in run["phases"]:
    r = ph["budget"]
    # Resumed from the SIGTERM checkpoint; process 0's budget ran out after its first step.
    assert r["latest_before"] == STOP_AT, r
    assert r["step"] == r["state_step"] == STOP_AT + 1, r
    assert r["preempted"] is False, r
    assert r["checkpoints_after"] == [STOP_AT, STOP_AT + 1], r


def test_resume_runs_to_the_end_and_equals_an_uninterrupted_run(run):
  for ph in run["phases"]:
    r, full = ph["resume"], ph["full"]
    assert r["latest_before"] == STOP_AT + 1, r
    assert r["step"] == r["state_step"] == NUM_STEPS and not r["preempted"], r
    assert r["checkpoints_after"][-1] == NUM_STEPS and r["model_written"], r
    assert full["latest_before"] is None, full
    assert full["step"] == NUM_STEPS and not full["preempted"], full
  resumed, uninterrupted = _losses(run["out"] / "run"), _losses(run["out"] / "full")
  assert sorted(resumed) == sorted(uninterrupted) == list(range(1, NUM_STEPS + 1))
  for step in resumed:
    assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])
  for rec in run["records"]:
    assert rec["num_params"] > 0 and rec["final_params_max_abs_diff"] == 0.0, rec
