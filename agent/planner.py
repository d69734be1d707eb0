"""What the offline researcher runs next: structural probes first, then Optuna's TPE over the whole space.

The plan, recomputed from the runs on disk at every step (the planner keeps no state):
1. Noise: the baseline again with another seed (search_agent.py).
2. Probes: the structural switches of train.py that the literature of small, clock-bound language
   models and earlier sessions on this machine rank highest, one run each, applied to the
   incumbent so what helped accumulates. Each costs one run whatever it changes, so the big
   levers are learnt in the first dozen runs.
3. Model-based search: Optuna's TPE sampler (multivariate, so settings that only help together
   are proposed together) fitted to every measured run of the session, asked for configurations
   until one is new. The study is rebuilt from disk each time, with a seed derived from the
   number of runs, so the same runs always give the same proposal.
"""
from __future__ import annotations

import warnings

# Every setting the researchers turn, with the values they may take (the random control samples the
# same lists uniformly). The baseline's values are among them.
SPACE: dict[str, list] = {
    "data_order": ["stream", "random"],
    "lr_schedule": ["constant", "linear", "cosine", "warmdown"],
    "optimizer": ["adamw", "muon"],
    "activation": ["gelu", "relu2", "swiglu"],
    "norm": ["layernorm", "rmsnorm"],
    "tie_embeddings": [True, False],
    "n_layers": [1, 2, 3, 4],
    "d_model": [64, 80, 96, 112, 128, 160],
    "n_heads": [2, 4, 8],
    "d_ff": [128, 192, 256, 384, 512],
    "learning_rate": [1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 6e-3, 8e-3],
    "muon_lr": [0.01, 0.02, 0.04],
    "batch_size": [4, 6, 8, 12, 16, 24],
    "n_history": [0, 1, 2, 3, 4, 5],
    "warmup_steps": [5, 10, 20, 40],
    "warmdown_frac": [0.2, 0.4, 0.6],
    "rope_theta": [10.0, 30.0, 100.0, 300.0, 1000.0],
    "weight_decay": [0.0, 0.05, 0.1, 0.2],
    "beta2": [0.9, 0.95, 0.99],
    "grad_clip": [0.0, 0.5, 1.0],
}

# Structural probes, most promising first: (changes, why). Each is tried once on the incumbent.
PROBES: list[tuple[dict, str]] = [
    ({"data_order": "random"}, "windows at random offsets give every step an independent sample of the text, where "
     "the in-order stream feeds consecutive slices of one play (0.25 bpb at 60 s on this machine)"),
    ({"lr_schedule": "linear"}, "annealing the learning rate to zero at the clock lets the last steps settle "
     "instead of bouncing at the peak rate"),
    ({"n_layers": 1, "d_model": 112}, "at a budget of seconds a shallow, wider model takes more steps and learns "
     "byte statistics faster than a deep one"),
    ({"optimizer": "muon"}, "orthogonalised momentum (Muon) trains the block matrices in fewer steps than AdamW "
     "in clock-bound speed-runs of small GPTs"),
    ({"activation": "relu2"}, "squared ReLU reaches a lower loss than GELU at the same steps in small "
     "transformers (Primer, So et al. 2021)"),
    ({"tie_embeddings": False}, "a head of its own frees the input embedding from also scoring the output; "
     "at 256 bytes of vocabulary it costs few parameters"),
    ({"norm": "rmsnorm"}, "RMSNorm drops the mean and bias of LayerNorm: as good, a little cheaper per step"),
]

MAX_ASKS = 200       # proposals asked of TPE before giving up on finding a new, valid configuration
TPE_STARTUP = 4      # measured runs TPE needs before it models instead of sampling at random


def valid(cfg: dict) -> bool:
    """A configuration train.py can run: heads divide the width into even head sizes, sizes positive."""
    d, h = cfg.get("d_model", 80), cfg.get("n_heads", 4)
    return (d % h == 0 and (d // h) % 2 == 0 and cfg.get("n_layers", 1) >= 1 and cfg.get("batch_size", 1) >= 1
            and cfg.get("d_ff", 1) >= 8 and cfg.get("n_history", 0) >= 0 and cfg.get("warmup_steps", 0) >= 1
            and cfg.get("learning_rate", 1) > 0)


def in_space(cfg: dict, names) -> bool:
    return all(cfg.get(n) in SPACE[n] for n in names)


def tpe_proposal(history: list[tuple[dict, float | None]], base: dict, seed: int, is_new) -> dict | None:
    """The next configuration TPE proposes: fitted to `history` (configuration, val_bpb or None if it failed),
    over the settings of SPACE that `base` has; `is_new(cfg)` says whether it may be run."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [n for n in SPACE if n in base]
    dists = {n: CategoricalDistribution(SPACE[n]) for n in names}
    with warnings.catch_warnings():  # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=TPE_STARTUP)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for cfg, value in history:
            if not in_space(cfg, names):  # a value outside the space (a hand edit): TPE cannot place it
                continue
            params = {n: cfg[n] for n in names}
            study.add_trial(create_trial(params=params, distributions=dists, value=value,
                                         state=TrialState.COMPLETE if value is not None else TrialState.FAIL))
        for _ in range(MAX_ASKS):
            trial = study.ask(dists)
            cfg = {**base, **trial.params}
            if valid(cfg) and is_new(cfg):
                return cfg
            study.tell(trial, state=TrialState.FAIL)  # measured or impossible: not a proposal
    return None
