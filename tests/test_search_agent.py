"""The offline researcher's decisions, from real session folders on disk."""
import json
from pathlib import Path

from agent.search_agent import (MOVES, SearchResearcher, parse_settings, read_knowledge, replace_value,
                                 setting_line)
from agent.providers.base import UserMessage

BASELINE = (Path(__file__).resolve().parents[1] / "trainer" / "baseline_train.py").read_text()


def write_run(session: Path, run_id: int, code: str, val_bpb, seed=None, status="completed", description=""):
    d = session / "runs" / f"{run_id:03d}"
    d.mkdir(parents=True)
    (d / "train.py").write_text(code)
    (d / "result.json").write_text(json.dumps({"run_id": run_id, "status": status, "val_bpb": val_bpb,
                                               "verified": status == "completed", "seed": seed,
                                               "description": description}))


def with_setting(code, name, value):
    line = setting_line(code, name)
    return code.replace(line, replace_value(line, value))


def decide(session):
    agent = SearchResearcher(session)
    reply = agent.complete("", [UserMessage(content="state")], [])
    return [(c.name, c.arguments) for c in reply.tool_calls]


def test_settings_parse_and_one_line_edits_keep_comments():
    cfg = parse_settings(BASELINE)
    assert cfg["learning_rate"] == 3e-3 and cfg["n_history"] == 3 and cfg["lr_schedule"] == "constant"
    line = setting_line(BASELINE, "learning_rate")
    new = replace_value(line, 0.006)
    assert new.startswith("learning_rate = 0.006") and "#" in new
    assert parse_settings(BASELINE.replace(line, new))["learning_rate"] == 0.006
    assert set(MOVES) <= set(cfg)


def test_first_measures_noise_by_repeating_the_baseline(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.41)
    calls = decide(tmp_path)
    assert calls[-1][0] == "submit_run" and calls[-1][1]["seed"] == 43
    assert not any(name == "edit_file" for name, _ in calls)


def test_keeps_a_change_only_beyond_noise_and_never_repeats(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.420, seed=43)  # noise 0.01
    linear = with_setting(BASELINE, "lr_schedule", "linear")
    write_run(tmp_path, 2, linear, 2.408)  # better by less than the noise: discarded
    k = read_knowledge(tmp_path)
    assert abs(k.noise - 0.01) < 1e-9
    assert k.incumbent.run_id == 0
    calls = decide(tmp_path)
    edit = [a for n, a in calls if n == "edit_file"][0]
    assert "lr_schedule" in edit["new_text"] and "cosine" in edit["new_text"]  # the untried value
    assert [a for n, a in calls if n == "restore_run"][0]["run_id"] == 0
    notes = [a["text"] for n, a in calls if n == "write_note"]
    assert any("run 2" in t and "discarded" in t for t in notes)


def test_accepted_move_is_confirmed_then_pushed_further(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.420, seed=43)
    linear = with_setting(BASELINE, "lr_schedule", "linear")
    write_run(tmp_path, 2, linear, 2.400)  # beats 2.415 by 0.015 < 2 * noise: confirm with another seed
    calls = decide(tmp_path)
    assert calls[-1][1].get("seed") == 43 and [a for n, a in calls if n == "restore_run"][0]["run_id"] == 2
    write_run(tmp_path, 3, linear, 2.398, seed=43)
    k = read_knowledge(tmp_path)
    assert k.incumbent.run_id == 2 and abs(k.incumbent_mean - 2.399) < 1e-9
    calls = decide(tmp_path)
    edit = [a for n, a in calls if n == "edit_file"][0]
    assert "'cosine'" in edit["new_text"]  # the schedule's other untried value, from the new incumbent
    assert [a for n, a in calls if n == "restore_run"][0]["run_id"] == 2


def test_budget_spent_gives_conclusion_and_finish(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.41)
    agent = SearchResearcher(tmp_path)
    reply = agent.complete("", [UserMessage(content="... The budget is spent (all runs are used) ...")], [])
    names = [c.name for c in reply.tool_calls]
    assert names == ["write_note", "finish"]
    assert "Limits of this method" in reply.tool_calls[0].arguments["text"]


def test_random_strategy_samples_untried_configurations(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.41)
    write_run(tmp_path, 1, BASELINE, 2.42, seed=43)
    agent = SearchResearcher(tmp_path, strategy="random", rng_seed=1)
    reply = agent.complete("", [UserMessage(content="state")], [])
    assert [c.name for c in reply.tool_calls][-1] == "submit_run"
    assert sum(c.name == "edit_file" for c in reply.tool_calls) >= 3


def test_noise_grows_when_a_confirmation_disagrees(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.420, seed=43)
    linear = with_setting(BASELINE, "lr_schedule", "linear")
    write_run(tmp_path, 2, linear, 2.400)
    write_run(tmp_path, 3, linear, 2.440, seed=43)  # the confirmation disagrees by 0.04
    k = read_knowledge(tmp_path)
    assert abs(k.noise - 0.04) < 1e-9 and k.incumbent.run_id == 0  # the gain no longer clears the noise
    notes = [a["text"] for n, a in decide(tmp_path) if n == "write_note"]
    assert any("run 1" in t and "another seed of the incumbent" in t for t in notes)


def test_conclusion_names_the_moves_the_noise_hid(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.420, seed=43)  # noise 0.01, incumbent mean 2.415
    write_run(tmp_path, 2, with_setting(BASELINE, "lr_schedule", "linear"), 2.408)  # within the noise
    write_run(tmp_path, 3, with_setting(BASELINE, "lr_schedule", "cosine"), 2.600)  # clearly worse
    agent = SearchResearcher(tmp_path)
    text = agent.complete("", [UserMessage(content="The budget is spent")], []).tool_calls[0].arguments["text"]
    assert "lr_schedule='linear' (mean 2.4080 over 1 seed(s))" in text
    assert "cosine" not in text


def write_contended(session: Path, run_id: int, code: str, val_bpb, seed=None, share=0.45):
    write_run(session, run_id, code, val_bpb, seed=seed)
    path = session / "runs" / f"{run_id:03d}" / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cpu_others": share}))


def test_a_run_that_shared_its_cores_neither_sets_the_noise_nor_wins(tmp_path):
    write_contended(tmp_path, 0, BASELINE, 2.55)  # run 0 itself contended: measure the baseline again
    calls = decide(tmp_path)
    assert calls[-1][0] == "submit_run" and calls[-1][1]["seed"] == 43
    assert "shared its cores" in calls[-1][1]["description"]
    write_run(tmp_path, 1, BASELINE, 2.410, seed=43)
    write_contended(tmp_path, 2, BASELINE, 2.600, seed=44)  # a slow repeat would read as 0.19 of noise
    k = read_knowledge(tmp_path)
    assert k.noise is None and k.incumbent.run_id == 1 and k.trials[2].status.startswith("contended")
    calls = decide(tmp_path)
    assert calls[-1][1]["seed"] == 45 and not any(n == "edit_file" for n, _ in calls)


def test_when_moves_run_out_the_runs_left_settle_what_the_noise_hid(tmp_path, monkeypatch):
    import agent.search_agent as search
    monkeypatch.setattr(search, "MOVES", {"n_history": ("add", [2], []), "d_ff": ("mul", [1.5], [])})
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.430, seed=43)  # noise 0.02, incumbent mean 2.420
    write_run(tmp_path, 2, with_setting(BASELINE, "n_history", 5), 2.405)  # better, within the noise
    write_run(tmp_path, 3, with_setting(BASELINE, "d_ff", 384), 2.412)  # better, within the noise
    calls = decide(tmp_path)  # first both together
    edits = [a["new_text"] for n, a in calls if n == "edit_file"]
    assert len(edits) == 2 and any("n_history = 5" in e for e in edits) and any("d_ff = 384" in e for e in edits)
    assert "seed" not in calls[-1][1] and calls[-1][1]["description"].startswith("combine")
    both = with_setting(with_setting(BASELINE, "n_history", 5), "d_ff", 384)
    write_run(tmp_path, 4, both, 2.415)  # together: still within the noise
    calls = decide(tmp_path)  # then more seeds, the best-looking first
    assert [a["new_text"] for n, a in calls if n == "edit_file"] == [
        replace_value(setting_line(BASELINE, "n_history"), 5)]
    assert calls[-1][1]["seed"] == 43
