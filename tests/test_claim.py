"""The session's claim: configurations, noise and whether the best beat it; notes whose numbers are stale."""
from pathlib import Path

from agent.tools import Note
from budget.models import BudgetStatus, RunResult, RunStatus, utcnow
from logs.claim import code_key, make_claim
from logs.methodology import stale_numbers, write_methodology

BASELINE = (Path(__file__).resolve().parents[1] / "trainer" / "baseline_train.py").read_text()
LINEAR = BASELINE.replace('lr_schedule = "constant"', 'lr_schedule = "linear"')


def put(session: Path, run_id: int, code: str, val_bpb, seed=None, status=RunStatus.completed, **extra) -> RunResult:
    folder = session / "runs" / f"{run_id:03d}"
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(code)
    return RunResult(run_id=run_id, status=status, verified=status == RunStatus.completed, val_bpb=val_bpb,
                     seed=seed, **extra)


def status(n: int) -> BudgetStatus:
    return BudgetStatus(runs_used=n, runs_remaining=0, match_time_remaining_secs=0, session_started_at=utcnow())


def test_the_same_program_is_one_configuration_whatever_its_comments_layout_or_seed():
    reformatted = BASELINE.replace("learning_rate = 3e-3", "learning_rate   =   0.003  # same number") + "\n# note\n"
    seeded = BASELINE.replace('seed = int(os.environ.get("TORCH_SEED", "42"))', "seed = 7")
    assert code_key(reformatted)[0] == code_key(BASELINE)[0] == code_key(seeded)[0]
    assert code_key(seeded)[1] == 7 and code_key(BASELINE)[1] is None
    assert code_key(LINEAR)[0] != code_key(BASELINE)[0]


def test_a_reseeded_baseline_that_scored_best_is_no_improvement(tmp_path):
    runs = [put(tmp_path, 0, BASELINE, 2.41), put(tmp_path, 1, BASELINE, 2.35, seed=43),  # the luckiest run
            put(tmp_path, 2, LINEAR, 2.39)]
    claim = make_claim(runs, tmp_path)
    assert claim.best_is_baseline and not claim.beat_noise and claim.best.runs == [0, 1]
    assert abs(claim.noise - 0.06) < 1e-9 and claim.noise_measured
    text = claim.sentence()
    assert text.startswith("Nothing beat the noise: the best configuration is the baseline's own (runs 0, 1;")
    assert "mean 2.3800 over 2 seed(s), spread 0.0600" in text and "noise between seeds is 0.0600" in text
    md = write_methodology(runs, [], status(3), "search-random", "budget spent", claim)
    assert "## Claim\n\nNothing beat the noise" in md
    assert "| 1 (best) | 0 | 43 | completed | 2.3500 |" in md  # another seed of run 0's configuration
    assert "Best verified" not in md and "better)" not in md


def test_a_change_beyond_the_noise_is_claimed_with_its_seeds_and_the_noise_it_beat(tmp_path):
    runs = [put(tmp_path, 0, BASELINE, 2.41), put(tmp_path, 1, BASELINE, 2.42, seed=43),
            put(tmp_path, 2, LINEAR, 2.30), put(tmp_path, 3, LINEAR, 2.31, seed=43),
            put(tmp_path, 4, BASELINE.replace("d_model = 80", "d_model = 96"), 2.299),  # better by less than noise
            put(tmp_path, 5, LINEAR.replace("n_layers = 3", "n_layers = 2"), None, status=RunStatus.crashed)]
    claim = make_claim(runs, tmp_path)
    assert claim.best.runs == [2, 3] and claim.best.seeds == [42, 43] and claim.beat_noise
    assert "Best configuration: runs 2, 3; mean 2.3050 over 2 seed(s), spread 0.0100" in claim.sentence()
    assert "0.1100 better than the baseline's mean 2.4150 over 2 seed(s), more than the noise" in claim.sentence()


def test_unmeasured_noise_and_contended_runs_are_said(tmp_path):
    runs = [put(tmp_path, 0, BASELINE, 2.41), put(tmp_path, 1, LINEAR, 2.30)]
    text = make_claim(runs, tmp_path).sentence()
    assert "noise between seeds was not measured" in text and "rerun SESSION --best --seeds 3" in text
    contended = [put(tmp_path / "c", 0, BASELINE, 2.5, cpu_others=0.6)]
    claim = make_claim(contended, tmp_path / "c")
    assert claim.contended_only and "shared its cores" in claim.sentence()
    assert make_claim([put(tmp_path / "n", 0, BASELINE, None, status=RunStatus.crashed)], tmp_path / "n").best is None


def test_notes_whose_numbers_do_not_match_the_runs_are_marked(tmp_path):
    runs = [put(tmp_path, 0, BASELINE, 2.41), put(tmp_path, 1, LINEAR, 2.3456)]
    assert stale_numbers("run 1 (probe: lr=0.006): 2.3456; kept", runs) == []
    assert stale_numbers("Run 1 got 2.346, better", runs) == []  # rounded as written
    assert stale_numbers("run 1 (probe): 2.2000; kept. run 7: 2.1", runs) == ["run 1 measured 2.3456 here, not 2.2000"]
    assert stale_numbers("best configuration (run 1): mean 2.3000", runs) == []  # a mean, not run 1's score
    notes = [Note("insight", "run 1 (probe: linear): 2.2000; kept: new incumbent.", 1),
             Note("insight", "run 0: 2.4100", 0)]
    md = write_methodology(runs, notes, status(2), "replay:search-plan", "budget spent", make_claim(runs, tmp_path),
                           replayed=True)
    assert ("2.2000; kept: new incumbent. **[numbers do not match the runs: written in the replayed session; run 1 "
            "measured 2.3456 here, not 2.2000]**") in md
    assert "- (after run 0) run 0: 2.4100\n" in md + "\n"
