"""Every named configuration of the research harness, defined once: `python -m experiments.run --method=NAME`.

A method is a set of fields (the core's and the harness's) applied after the preset and before the command
line, so `--method=paced_greedy --lr=4e-4` is PACED-RL's greedy rule at another learning rate. The
experiments' scripts and the tests loop over the names of GROUPS. A new objective or selector is one entry
here, beside its code.

    python -m experiments.methods                # every method with what it changes
    python -m experiments.methods comparison     # the names of one group, on one line (for the shell scripts)
"""

import sys

METHODS = {  # name: (what it is, its config fields)
    # the comparison: PACED-RL, its two halves and the paper's baselines
    "paced": ("PACED-RL in full: TB loss anchored on π_old, β·log Z_φ selection near τ, error-prioritized replay",
              {"algo": "paced"}),
    "paced_select_only": ("PACED-RL's selection without its replay buffer", {"algo": "paced", "replay": "off"}),
    "paced_replay_only": ("PACED-RL's loss and replay with uniform selection (the TB loss without its scheduler)",
                          {"algo": "paced", "select": "uniform"}),
    "grpo": ("GRPO as TRL computes it: group-normalized advantages, clipped ratio, uniform prompts", {"algo": "grpo"}),
    "grpo_dynamic": ("GRPO with DAPO's dynamic sampling: all-equal groups dropped, more prompts rolled out",
                     {"algo": "grpo", "dynamic_sampling": True}),
    "flowrl": ("FlowRL: TB with length-normalized log-probs against π_ref and a pooled-state log Z head", {"algo": "flowrl"}),
    # the investigation of why PACED-RL does not win on the testbed: one switch each
    "paced_pool256": ("a pool of 256 candidates, a quarter of the slots explored",
                      {"algo": "paced", "pool_size": 256, "explore_frac": 0.25}),
    "paced_greedy": ("the paper's pure greedy rule: no exploration slots (as the defaults)",
                     {"algo": "paced", "explore_frac": 0.0}),
    "paced_explore": ("half of the B slots drawn uniformly from the rest of the pool", {"algo": "paced", "explore_frac": 0.5}),
    "paced_one_lr": ("Z_φ's layers at one Adam lr whatever their width", {"algo": "paced", "logz_lr_fan_in": 0}),
    "paced_replay_trains_logz": ("replayed (correct-only) samples also train Z_φ, reward 1", {"algo": "paced", "replay_trains_logz": "raw"}),
    "paced_replay_logz_off": ("replayed samples train θ only, not Z_φ", {"algo": "paced", "replay_trains_logz": "off"}),
    "paced_sigmoid": ("Z_φ's output through a sigmoid with its own gradient (it can trap a prompt at p̂ ≈ 0)",
                      {"algo": "paced", "logz_output": "sigmoid"}),
    "paced_linear": ("Z_φ's output unbounded (the paper's class), p̂ clipped where used", {"algo": "paced", "logz_output": "linear", "logz_lr": 3e-3}),
    "paced_logz_lr3e-3": ("Z_φ at Adam lr 3e-3", {"algo": "paced", "logz_lr": 3e-3}),
    "paced_logz_lr3e-2": ("Z_φ at Adam lr 3e-2", {"algo": "paced", "logz_lr": 3e-2}),
    "paced_mean_last": ("e(x) with the last prompt token's state beside the mean", {"algo": "paced", "logz_features": "mean_last"}),
    # fairness checks: the shared lr was chosen for PACED-RL; FlowRL's authors step several times per batch
    "grpo_lr1e-4": ("GRPO at lr 1e-4", {"algo": "grpo", "lr": 1e-4}),
    "grpo_lr4e-4": ("GRPO at lr 4e-4", {"algo": "grpo", "lr": 4e-4}),
    "paced_lr4e-4": ("PACED-RL at lr 4e-4", {"algo": "paced", "lr": 4e-4}),
    "flowrl_4_updates": ("FlowRL with 4 optimizer steps per rollout batch", {"algo": "flowrl", "updates_per_batch": 4}),
    # the scheduling study: the competing selectors with the GRPO loss and with the TB loss
    "grpo_history": ("GRPO with MoPPS-style history selection", {"algo": "grpo", "select": "history"}),
    "grpo_oracle": ("GRPO with the exact-accuracy oracle (testbed only)", {"algo": "grpo", "select": "oracle"}),
    "tb_history": ("the TB loss with history selection", {"algo": "paced", "select": "history"}),
    "tb_regress": ("the TB loss with a regressor on e(x) as the selector", {"algo": "paced", "select": "regress"}),
    "tb_hybrid": ("the TB loss with history whose prior mean is Z_φ's p̂", {"algo": "paced", "select": "hybrid"}),
    "tb_oracle": ("the TB loss with the exact-accuracy oracle (testbed only)", {"algo": "paced", "select": "oracle"}),
    "tb_static_oracle": ("the TB loss selecting by the initial policy's measured accuracy (SmolLM2's file by default)",
                         {"algo": "paced", "select": "static", "accuracy_file": "results/smollm2_study/initial_accuracy.json"}),
    "grpo_static_oracle": ("GRPO selecting by the initial policy's measured accuracy (SmolLM2's file by default)",
                           {"algo": "grpo", "select": "static", "accuracy_file": "results/smollm2_study/initial_accuracy.json"}),
    "paced_memory": ("PACED-RL with Z_φ refitted on every observed group (10 passes, half-life 4 steps) and the highest p̂ "
                     "chosen (τ = 1): the estimator and rule registered offline on the SmolLM2 records (results/log/estimator_memory.md)",
                     {"algo": "paced", "logz_memory_passes": 10, "logz_memory_half_life": 4.0, "tau": 1.0}),
    "tb_hybrid_greedy": ("the hybrid selector without exploration slots",
                         {"algo": "paced", "select": "hybrid", "explore_frac": 0.0}),
}

GROUPS = {  # the names each experiment loops over
    "comparison": ["grpo", "grpo_dynamic", "flowrl", "paced_select_only", "paced_replay_only", "paced"],
    "investigation": ["paced_pool256", "paced_greedy", "paced_replay_trains_logz", "paced_logz_lr3e-3",
                      "paced_logz_lr3e-2", "paced_mean_last", "grpo_lr1e-4", "grpo_lr4e-4", "paced_lr4e-4",
                      "flowrl_4_updates"],
    "study": ["grpo", "grpo_dynamic", "grpo_history", "grpo_oracle", "paced", "tb_history", "tb_regress", "tb_hybrid",
              "tb_oracle"],
    "study_zphi": ["paced_greedy", "tb_hybrid_greedy", "paced_mean_last"],
    "estimator": ["paced", "paced_sigmoid", "paced_linear", "paced_replay_logz_off", "paced_replay_trains_logz"],
    "golden": ["paced", "grpo", "grpo_dynamic", "flowrl"],  # test_all.py's frozen runs
    "smollm2_study": ["grpo", "grpo_history", "grpo_dynamic", "paced_replay_only", "paced"],  # experiments/smollm2_study.sh
    "smollm2_again": ["paced_replay_only", "paced", "tb_static_oracle"],  # experiments/smollm2_again.sh, budgets A and B
    "smollm2_budget": ["grpo", "paced", "tb_static_oracle"],  # experiments/smollm2_again.sh, budget C
    "smollm2_memory": ["paced_memory"],  # experiments/smollm2_memory.sh, budgets A and C
}


def fields_of(name: str) -> dict:
    """The config fields of a named method; an unknown name is refused with the list."""
    if name not in METHODS:
        raise SystemExit(f"config: unknown method {name!r}; methods: {', '.join(METHODS)} (python -m experiments.methods)")
    return dict(METHODS[name][1])


if __name__ == "__main__":
    if sys.argv[1:]:
        if sys.argv[1] not in GROUPS:
            raise SystemExit(f"experiments.methods: unknown group {sys.argv[1]!r}; groups: {', '.join(GROUPS)}")
        print(" ".join(GROUPS[sys.argv[1]]))
    else:
        for name, (doc, kw) in METHODS.items():
            print(f"{name:<26} {doc}\n{'':<26} {' '.join(f'--{k}={v}' for k, v in kw.items())}")
