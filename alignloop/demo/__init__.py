"""The embedded demo: the whole loop on a built-in toy task, in one command (`alignloop demo`).

    domain.py   the toy domain (short movie reviews): pretraining corpus, demonstrations, prompts, and the hidden
                gold scorer the simulated labelers judge by
    demo.py     DemoSize, the demo's PipelineConfig, its two own stages (data, base model) and run_demo: the
                wiring onto `alignloop.pipeline` (run folder, stages, simulated labelers, report)
"""
