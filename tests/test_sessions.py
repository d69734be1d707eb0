"""Finding sessions and the latest one, and `watch` of a run in flight, on real ledgers and run folders."""
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from agent.cli import main
from agent.outcome import ExitCode
from budget.ledger import Ledger
from budget.models import Budget, RunRequest, RunResult, RunStatus
from logs.claim import make_claim
from logs.plot import results_tsv, text_chart
from logs.sessions import NoSession, find_sessions, resolve_session
from logs.watch import frame

CODE = (Path(__file__).resolve().parents[1] / "trainer" / "baseline_train.py").read_text()


def session(root: Path, name: str, scores=(2.4,)) -> Path:
    folder = root / name
    with Ledger.open(folder, Budget(max_runs=5)) as ledger:
        for score in scores:
            run_id = ledger.reserve(RunRequest(train_code=CODE, description=f"scored {score}"))
            (folder / "runs" / f"{run_id:03d}").mkdir(parents=True)
            (folder / "runs" / f"{run_id:03d}" / "train.py").write_text(CODE)
            ledger.finish(run_id, RunResult(run_id=run_id, status=RunStatus.completed, verified=True, val_bpb=score))
    return folder


def test_the_latest_session_is_the_last_started_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PGOLF_SESSIONS_DIR", str(tmp_path))
    with pytest.raises(NoSession, match="no session under .*pgolf-agent run"):
        resolve_session(None)
    session(tmp_path, "zz-first")
    time.sleep(0.01)
    session(tmp_path, "aa-second")
    (tmp_path / "not-a-session").mkdir()
    assert [p.name for p in find_sessions()] == ["zz-first", "aa-second"]
    assert resolve_session(None).name == "aa-second" and resolve_session("zz-first").name == "zz-first"
    with pytest.raises(NoSession, match="no session in .*not-a-session .* `pgolf-agent sessions` lists"):
        resolve_session("not-a-session")
    assert main(["service", "status"]) == 0  # the latest, not sessions/manual


def test_bad_session_names_fail_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGOLF_SESSIONS_DIR", str(tmp_path))
    assert main(["report", str(tmp_path / "nowhere")]) == ExitCode.SETUP
    assert main(["compare", str(tmp_path / "nowhere"), "x"]) == ExitCode.SETUP
    assert main(["rerun", "--best"]) == ExitCode.SETUP
    assert "no session under" in capsys.readouterr().err
    session(tmp_path, "s")
    assert main(["rerun", "s", "--runs", "9"]) == ExitCode.SETUP
    assert "run 9 is not in" in capsys.readouterr().err
    assert not (tmp_path / "s" / "reruns").exists()  # nothing charged, nothing made


def test_watch_shows_the_run_in_flight_with_its_step_and_loss(tmp_path):
    folder = session(tmp_path, "live", scores=(2.41, 2.39))
    with Ledger.open(folder) as ledger:
        run_id = ledger.reserve(RunRequest(train_code=CODE, description="wider model"))
        run_dir = folder / "runs" / f"{run_id:03d}"
        run_dir.mkdir(parents=True)
        (run_dir / "stderr.log").write_text("params 283,728 | device cpu | budget 180s\n"
                                            "step 40 | loss 2.5012 | tok/s 900 | 12s\nstep 80 | loss 2.1234 | tok/s 910 | 24s\n")
        (folder / "notes.jsonl").write_text(json.dumps({"kind": "insight", "text": "wider helps", "after_run": 1}) + "\n")
        console = Console(record=True, width=400)
        console.print(frame(folder, ledger.status(), ledger.runs()))
    text = console.export_text()
    assert "run 2 in flight: wider model" in text and "step 80, loss 2.1234" in text
    assert "3 of 5" in text and "latest note: [insight] wider helps" in text
    assert "running" in text and "claim so far: Only the baseline's configuration was measured (runs 0, 1;" in text


def test_results_tsv_and_text_chart_without_matplotlib(tmp_path):
    runs = [RunResult(run_id=0, status=RunStatus.completed, verified=True, val_bpb=2.4, total_steps=100,
                      training_secs=180.04, cpu_others=0.05, description="baseline\twith a tab"),
            RunResult(run_id=1, status=RunStatus.crashed, description="oops")]
    assert results_tsv(runs).splitlines() == [
        "id\tstatus\tverified\tval_bpb\tsteps\tseconds\tcpu_others\tdescription",
        "0\tcompleted\ttrue\t2.400000\t100\t180.0\t0.050\tbaseline with a tab", "1\tcrashed\tfalse\t\t\t\t\toops"]
    chart = text_chart(runs, make_claim(runs, tmp_path))
    assert "   0    2.4000    2.4000  #" in chart and "   1         -" in chart and "crashed" in chart


def test_without_matplotlib_a_session_writes_a_text_chart_and_says_how_to_get_the_picture(tmp_path, monkeypatch):
    import sys

    from logs.plot import draw_progress

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    runs = [RunResult(run_id=0, status=RunStatus.completed, verified=True, val_bpb=2.4)]
    picture, note = draw_progress(tmp_path, runs, make_claim(runs, tmp_path))
    assert picture.name == "progress.txt" and not (tmp_path / "progress.png").exists()
    assert "pip install -e '.[plot]'" in note and (tmp_path / "results.tsv").exists()
