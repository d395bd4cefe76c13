"""The research harness beside the method: it imports the method and the loop, never the other way round.

- compare.sh / compare.py: named methods × seeds on the testbed, then the cross-run table and plots;
- study.sh / study.py: where difficulty scheduling pays (regimes × selectors × losses, 3 seeds);
- bench.py: one step's time split into its phases, throughput and memory.

Run them from the repository root: `bash experiments/compare.sh`, `python -m experiments.compare --runs=DIR`,
`bash experiments/study.sh`, `python -m experiments.bench`.
"""
