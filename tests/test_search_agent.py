"""The offline researcher's decisions, from real session folders on disk, and the switches it turns."""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from agent.planner import PROBES, SPACE
from agent.providers.base import UserMessage
from agent.search_agent import SearchResearcher, parse_settings, read_knowledge, replace_value, setting_line

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
    assert set(SPACE) <= set(cfg)
    norm = setting_line(BASELINE, "norm")
    edited = replace_value(norm, "rmsnorm")  # the comment stays in its column
    assert edited.startswith('norm = "rmsnorm" ') and edited.index("#") == norm.index("#")


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
    assert edit["new_text"].startswith('data_order = "random"')  # the first probe not tried yet
    assert [a for n, a in calls if n == "restore_run"][0]["run_id"] == 0
    notes = [a["text"] for n, a in calls if n == "write_note"]
    assert any("run 2" in t and "discarded" in t for t in notes)


def test_accepted_move_is_confirmed_then_built_on(tmp_path):
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
    assert edit["new_text"].startswith('data_order = "random"')  # the next probe, on the new incumbent
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


def test_a_baseline_unverified_because_it_shared_its_cores_is_run_again(tmp_path):
    # contention stretches the clock too: the baseline ran over its grace while other work took the cores
    write_run(tmp_path, 0, BASELINE, 4.56, status="unverified")
    path = tmp_path / "runs" / "000" / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cpu_others": 0.59}))
    calls = decide(tmp_path)
    assert calls[-1][0] == "submit_run" and "shared its cores" in calls[-1][1]["description"]


def test_probes_the_noise_hid_are_combined_then_given_more_seeds(tmp_path, monkeypatch):
    import agent.search_agent as search
    monkeypatch.setattr(search, "PROBES", [({"n_history": 5}, "more history"), ({"d_ff": 384}, "wider MLP")])
    monkeypatch.setattr(search, "tpe_proposal", lambda *args, **kwargs: None)  # nothing new to propose
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


# --- the planner -------------------------------------------------------------------------------------

def scored(cfg: dict, seed: int) -> float:
    """A stand-in for a training run: the structural levers help, the rest barely matters, plus seed noise."""
    noise = random.Random(json.dumps([cfg, seed], sort_keys=True)).gauss(0, 0.01)
    return (2.9 - 0.25 * (cfg["data_order"] == "random") - 0.05 * (cfg["lr_schedule"] != "constant")
            - 0.04 * (3 - cfg["n_layers"]) + 0.01 * abs(cfg["n_history"] - 3) + noise)


def play(session: Path, runs: int, agent=None, fresh_each_step=False) -> list[tuple[str, dict]]:
    """Drive the researcher through `runs` runs of a session on disk, applying its tool calls as the toolbox does."""
    (session / "settings.json").write_text(json.dumps({"budget": {"max_runs": runs}}))
    if not (session / "runs").exists():
        write_run(session, 0, BASELINE, scored(parse_settings(BASELINE), 42), description="baseline")
    decisions = []
    while len(list((session / "runs").iterdir())) < runs:
        if fresh_each_step or agent is None:
            agent = SearchResearcher(session)
        reply = agent.complete("", [UserMessage(content="state")], [])
        work, submitted = None, False
        for call in reply.tool_calls:
            args = call.arguments
            if call.name == "restore_run":
                work = (session / "runs" / f"{args['run_id']:03d}" / "train.py").read_text()
            elif call.name == "edit_file":
                assert work.count(args["old_text"]) == 1
                work = work.replace(args["old_text"], args["new_text"])
            elif call.name == "submit_run":
                run_id = len(list((session / "runs").iterdir()))
                seed = args.get("seed", 42)
                write_run(session, run_id, work, scored(parse_settings(work), seed), seed=args.get("seed"),
                          description=args["description"])
                decisions.append((args["description"], args))
                submitted = True
        if not submitted:
            break
    return decisions


def test_structural_probes_come_first_and_what_helped_accumulates(tmp_path):
    decisions = play(tmp_path, 2 + len(PROBES) + 1)
    assert decisions[0][0] == "baseline repeated with another seed"
    probes = [d for d, _ in decisions if d.startswith("probe: ")]
    assert probes[0] == "probe: data_order='random'" and len(probes) == len(PROBES)
    assert all("kept only if it beats" in args["hypothesis"] for d, args in decisions[1:] if d.startswith("probe"))
    k = read_knowledge(tmp_path)
    # the levers that beat the noise were kept together in the incumbent
    assert k.incumbent.cfg["data_order"] == "random" and k.incumbent.cfg["n_layers"] == 1
    assert k.incumbent.cfg["lr_schedule"] == "linear"


def test_tpe_proposes_only_new_configurations_over_a_long_session(tmp_path):
    decisions = play(tmp_path, 30)
    k = read_knowledge(tmp_path)
    keys = [k.key(t.cfg, t.seed) for t in k.trials]
    assert len(keys) == len(set(keys)) == 30  # no configuration ran twice with the same seed
    tpe = [d for d, _ in decisions if d.startswith("TPE: ")]
    assert len(tpe) >= 10
    first_seen = {}
    for t in k.trials:
        first_seen.setdefault(json.dumps(t.cfg, sort_keys=True), t)
    tpe_runs = [t for t in k.trials if t.description.startswith("TPE: ")]
    assert all(first_seen[json.dumps(t.cfg, sort_keys=True)] is t for t in tpe_runs)  # each a new configuration
    assert all(cfg_value in SPACE[name] for t in tpe_runs for name, cfg_value in t.cfg.items() if name in SPACE)


def test_a_resumed_researcher_decides_as_the_one_that_never_stopped(tmp_path):
    steady, resumed = tmp_path / "steady", tmp_path / "resumed"
    steady.mkdir(), resumed.mkdir()
    one = play(steady, 16, agent=None)
    assert one == play(resumed, 16, fresh_each_step=True)


def test_noise_decides_what_is_kept(tmp_path):
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.450, seed=43)  # noise 0.04
    write_run(tmp_path, 2, with_setting(BASELINE, "data_order", "random"), 2.400)  # 0.03 better: not enough
    write_run(tmp_path, 3, with_setting(BASELINE, "lr_schedule", "linear"), 2.370)  # 0.06 better: kept
    k = read_knowledge(tmp_path)
    assert k.incumbent.run_id == 3 and abs(k.noise - 0.04) < 1e-9
    calls = decide(tmp_path)  # a gain under twice the noise is confirmed before anything else
    assert calls[-1][1]["description"] == "confirm run 3 with another seed" and calls[-1][1]["seed"] == 43


def test_the_claimed_best_is_a_configuration_with_its_seeds_and_the_last_run_confirms_it(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"budget": {"max_runs": 4}}))
    write_run(tmp_path, 0, BASELINE, 2.410)
    write_run(tmp_path, 1, BASELINE, 2.420, seed=43)
    fast = with_setting(BASELINE, "data_order", "random")
    write_run(tmp_path, 2, fast, 2.200)  # far beyond the noise, one seed: the last run confirms it
    calls = decide(tmp_path)
    assert calls[-1][1]["description"] == "confirm run 2 with another seed"
    write_run(tmp_path, 3, fast, 2.230, seed=43)
    agent = SearchResearcher(tmp_path)
    assert agent.best_code() == fast
    summary = agent.summary(read_knowledge(tmp_path))
    assert "mean 2.2150 over 2 seed(s) (42: 2.2000, 43: 2.2300; spread 0.0300)" in summary


def test_every_setting_the_planner_turns_is_one_line_of_train_py():
    cfg = parse_settings(BASELINE)
    assert all(cfg[name] in values for name, values in SPACE.items())  # the baseline is a point of the space
    for changes, _ in PROBES:
        assert all(value in SPACE[name] and value != cfg[name] for name, value in changes.items())


# --- the switches of train.py ------------------------------------------------------------------------

def load_trainer():
    """trainer/baseline_train.py as a module (its settings are module globals the model reads when built)."""
    trainer_dir = Path(__file__).resolve().parents[1] / "trainer"
    sys.path.insert(0, str(trainer_dir))
    try:
        spec = importlib.util.spec_from_file_location("train_under_test", trainer_dir / "baseline_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(trainer_dir))
    return module


@pytest.mark.parametrize("changes", [{}, {"norm": "rmsnorm"}, {"activation": "relu2"}, {"activation": "swiglu"},
                                     {"tie_embeddings": False}, {"optimizer": "muon"}, {"lr_schedule": "warmdown"}])
def test_each_switch_trains_and_stays_causal(changes, monkeypatch):
    train = load_trainer()
    monkeypatch.setattr(train, "device", "cpu")
    for name, value in {"d_model": 32, "d_ff": 64, "n_layers": 2, **changes}.items():
        monkeypatch.setattr(train, name, value)
    torch.manual_seed(0)
    model = train.GPT()
    assert (model.head.weight is model.tok_emb.weight) == train.tie_embeddings
    optimizers = train.make_optimizers(model)
    assert len(optimizers) == (2 if train.optimizer == "muon" else 1)
    x = torch.randint(1, 256, (2, 24))
    losses = []
    for step in range(8):
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = train.lr_at(group["peak_lr"], step, step / 8)
        loss = model(x, x)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it learns
    model.eval()
    changed = x.clone()
    changed[:, 12:] = torch.randint(1, 256, (2, 12))
    with torch.no_grad():  # logits before position 12 must not see the bytes from 12 on
        assert torch.allclose(model(x)[:, :12], model(changed)[:, :12], atol=1e-5)


def test_random_windows_are_rows_of_bos_and_train_bytes(monkeypatch):
    train = load_trainer()
    import prepare
    data = torch.arange(1000, dtype=torch.uint8) % 251 + 1
    monkeypatch.setattr(prepare, "load_split", lambda split: data if split == "train" else None)
    monkeypatch.setattr(train, "device", "cpu")
    x, y = next(train.random_windows(4, 16))
    assert x.shape == y.shape == (4, 16) and (x[:, 0] == prepare.BOS_TOKEN).all()
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in y:  # each target row is a contiguous stretch of the split
        start = int((data == row[0]).nonzero()[0])
        assert torch.equal(row, data[start:start + 16].long())
