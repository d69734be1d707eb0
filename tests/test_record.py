"""The session record on real sessions: two recorded sessions with real short runs, read back as the picture,
results.tsv, `sessions`, `report`, `compare`, `watch`, and run again with `rerun` on a budget of its own."""
import csv
import os
import shutil
from pathlib import Path

import pytest

from agent.cli import main
from agent.outcome import ExitCode
from agent.session import Session, SessionSettings
from budget.ledger import Ledger
from budget.models import Budget, RunResult, RunStatus
from logs.claim import make_claim
from logs.plot import CLIP_IQRS, TSV_COLUMNS

pytestmark = pytest.mark.slow
# Tiny runs; the grace lets a 2 s run's slowest evaluation frame count on its clock without failing it
SHORT = Budget(max_runs=4, session_secs=1800, time_budget_secs=2, run_timeout_secs=40, clock_grace_secs=10)
KEEP = os.environ.get("PGOLF_KEEP_RECORD")  # a folder to copy the recorded sessions to, to look at them


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, corpus):
    """Two offline sessions under one sessions folder: `random` (a), then the planning `search` (b)."""
    root = tmp_path_factory.mktemp("sessions")
    for name, agent in (("a", "random"), ("b", "search")):
        session = Session(SessionSettings(session_dir=root / name, agent=agent, budget=SHORT))
        session.run()
        session.service.close()  # as the command's exit does: the session is no longer held
    if KEEP:
        shutil.copytree(root, Path(KEEP), dirs_exist_ok=True)
    saved = os.environ.get("PGOLF_SESSIONS_DIR")
    os.environ["PGOLF_SESSIONS_DIR"] = str(root)
    yield root
    os.environ.pop("PGOLF_SESSIONS_DIR") if saved is None else os.environ.update(PGOLF_SESSIONS_DIR=saved)


def ledger_runs(folder: Path) -> list[RunResult]:
    with Ledger.open(folder, exclusive=False) as ledger:
        return ledger.runs()


def recorded_runs(folder: Path) -> list[dict]:
    """The runs as recorded (without the budget left, which is computed when read)."""
    return [r.model_dump(exclude={"runs_remaining", "match_time_remaining_secs"}) for r in ledger_runs(folder)]


def test_each_session_leaves_its_picture_and_results_tsv(recorded):
    for name in ("a", "b"):
        folder, runs = recorded / name, ledger_runs(recorded / name)
        assert len(runs) >= 2  # a multi-run session
        assert (folder / "progress.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        with open(folder / "results.tsv", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        assert tuple(rows[0]) == TSV_COLUMNS and len(rows) == len(runs) + 1
        for row, r in zip(rows[1:], runs):
            assert row[:3] == [str(r.run_id), r.status.value, str(r.verified).lower()]
            assert (float(row[3]) if row[3] else None) == (None if r.val_bpb is None else round(r.val_bpb, 6))
            assert row[4] == str(r.total_steps) and float(row[5]) == round(r.training_secs, 1)
            assert row[7] == r.description
        assert make_claim(runs, folder).sentence() in (folder / "methodology.md").read_text()


def test_the_picture_marks_failures_clips_outliers_and_steps_the_best(recorded):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from logs.plot import _draw

    folder = recorded / "b"
    runs = ledger_runs(folder)
    n = len(runs)
    extra = [RunResult(run_id=n, status=RunStatus.crashed, description="crash"),
             RunResult(run_id=n + 1, status=RunStatus.timeout, description="slow"),
             RunResult(run_id=n + 2, status=RunStatus.unverified, val_bpb=40.0, description="flagged outlier")]
    fig, ax = plt.subplots()
    _draw(ax, runs + extra, make_claim(runs, folder))
    labels = ax.get_legend_handles_labels()[1]
    for label in ("best verified so far", "crashed (no score; top strip)", "timed out (no score; top strip)",
                  "unverified (flagged; its number)", "clipped: off the scale (value beside)"):
        assert label in labels
    assert any(label.startswith("baseline ± noise") for label in labels)
    assert ax.get_ylim()[1] < 40.0  # the outlier does not set the scale
    assert any(text.get_text() == "40.000" for text in ax.texts)  # its value is written beside its marker
    best = next(line for line in ax.lines if line.get_label() == "best verified so far")
    assert best.get_drawstyle() == "steps-post"
    ys = list(best.get_ydata())
    assert ys == sorted(ys, reverse=True)  # never rises
    assert ax.get_xlabel() == "run" and "val_bpb" in ax.get_ylabel()
    plt.close(fig)
    assert CLIP_IQRS == 3.0


def test_sessions_report_and_compare_read_both_sessions(recorded, capsys):
    assert main(["sessions"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split("\t")[:3] == ["id", "researcher", "runs"]
    rows = {line.split("\t")[0]: line.split("\t") for line in listing[1:]}
    assert rows["a"][1] == "random (search-random)" and rows["b"][1] == "search (search-plan)"
    for name in ("a", "b"):
        assert rows[name][2] == f"{len(ledger_runs(recorded / name))}/4" and rows[name][5] == "finished"

    assert main(["report"]) == 0  # the latest: b
    report = capsys.readouterr().out
    runs_b = ledger_runs(recorded / "b")
    assert f"session: {recorded / 'b'}" in report
    assert f"claim: {make_claim(runs_b, recorded / 'b').sentence()}" in report
    assert "id\tconfig\tstatus" in report and "1\t0\t" in report  # run 1 is the baseline again, another seed

    assert main(["compare", "a", str(recorded / "b")]) == 0
    table = {line.split("\t")[0]: line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()}
    assert table[""] == ["a", "b"]
    assert table["runs used"] == [f"{len(ledger_runs(recorded / n))} of 4" for n in ("a", "b")]
    assert table["tokens"] == ["0", "0"] and table["cost"] == ["$0.00", "$0.00"]  # offline researchers
    assert table["failed runs (crashed, timed out, interrupted)"] == [
        str(sum(r.status in (RunStatus.crashed, RunStatus.timeout, RunStatus.interrupted) for r in ledger_runs(recorded / n)))
        for n in ("a", "b")]

    assert main(["watch", "--once"]) == 0
    watched = capsys.readouterr().out
    assert "session" in watched and "no run in flight" in watched and "latest note: [conclusion]" in watched


def test_rerun_prints_recorded_and_new_side_by_side_on_a_budget_of_its_own(recorded, capsys):
    folder = recorded / "b"
    before = ledger_runs(folder)
    recorded_before = recorded_runs(folder)
    with Ledger.open(folder, exclusive=False) as ledger:
        status_before = ledger.status()
    code = main(["rerun", "b", "--runs", "0", "--seeds", "2"])
    assert code in (ExitCode.OK, ExitCode.NOT_VERIFIED)
    out = capsys.readouterr().out
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("runs 0\t")]
    recorded0 = before[0]
    assert rows[0][:5] == ["runs 0", "42", "0", f"{recorded0.val_bpb:.4f}", "0"]  # run 0 beside its rerun
    assert rows[1][:3] == ["runs 0", "43", "-"] and rows[1][4] == "1"  # a new seed: nothing recorded beside it
    assert rows[2][1] == "all" and rows[2][3].startswith(f"mean {recorded0.val_bpb:.4f}, spread 0.0000 over 1")
    # the session's ledger is untouched; the reruns have their own, named
    assert recorded_runs(folder) == recorded_before
    with Ledger.open(folder, exclusive=False) as ledger:
        assert ledger.status().runs_used == status_before.runs_used
    (rerun_dir,) = (folder / "reruns").iterdir()
    with Ledger.open(rerun_dir, exclusive=False) as ledger:
        status, reruns = ledger.status(), ledger.runs()
    assert status.budget.max_runs == 2 and status.budget.time_budget_secs == SHORT.time_budget_secs
    assert [r.seed for r in reruns] == [42, 43] and reruns[0].description == "rerun of run 0, seed 42"
    assert [r.code_sha256 for r in reruns] == [recorded0.code_sha256] * 2
    assert f"reruns recorded in {rerun_dir}" in out
