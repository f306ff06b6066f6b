"""The whole loop in one command: the embedded demo, the pipeline and evaluation.

    alignloop demo [--quick] [--human | --resume]     alignloop.demo.demo.run_demo
    alignloop pipeline config.yaml                    alignloop.demo.pipeline.run_pipeline (PipelineConfig)
    alignloop eval --policy P --reference R ...       alignloop.demo.evaluate

Modules: `domain` (the toy review domain and the hidden gold scorer), `labelers` (simulated Bradley-Terry judges and
a careless one, labeling through the feedback store), `pipeline` (resumable stages in one run folder), `stages` (the
evaluation stage), `evaluate` (sampling, KL to a reference, reward, win rate, best-of-N), `report` (plots and
report.md / report.html).
"""
