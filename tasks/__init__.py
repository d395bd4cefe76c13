"""The bundled tasks, made by the project because nothing can be downloaded in CI or a classroom:

- testbed.py: a character tokenizer, a tiny Llama warm-started on reversed-digit sums, the train and
  held-out prompts, and the difficulty regimes of the scheduling study;
- exact.py: the testbed's exact per-prompt accuracy by teacher forcing (no sampling): a noise-free
  held-out accuracy, a calibration target for p̂ and the oracle selector;
- smollm2.py: a real pretrained chat model (SmolLM2-135M-Instruct, from a wheel on the package index)
  and a natural-language arithmetic task with graded difficulty.

The testbed is shipped in the repository (testbed/, and testbed/small for the tests), each build with a
MANIFEST.json of its files' sha256; train.py checks it before a run whose model or data points inside
`testbed_dir`, and converts the SmolLM2 model and builds a regime's training file on first use.
"""

import os


def ensure_for(cfg, log=print):
    """Check the shipped testbed and build, on first use, each derived task that cfg's model or data point into
    (under cfg.testbed_dir)."""
    from tasks import smollm2, testbed

    if not cfg.testbed_dir:
        return
    tb = os.path.normpath(cfg.testbed_dir)
    inside = lambda d: [p for p in (cfg.model, cfg.train_data, cfg.eval_data) if os.path.normpath(p).startswith(d + os.sep)]  # noqa: E731
    smol = os.path.join(tb, smollm2.SUBDIR)
    if inside(smol):  # the smollm2_arith preset: the model converted from the installed wheel, and its task
        smollm2.ensure(cfg.testbed_dir, log=log)
    if len(inside(smol)) < len(inside(tb)):  # the testbed: shipped, never rebuilt behind the user's back
        if cfg.testbed_check:
            testbed.check(cfg.testbed_dir)
    if cfg.regime and not os.path.exists(cfg.train_data):
        testbed.make_regime(cfg.testbed_dir, cfg.regime)
