"""The whole loop on your own models and data, as resumable stages in one run folder (`alignloop pipeline`).

    config.py       PipelineConfig (+ FeedbackSettings, AIFeedbackSettings, EvalSettings, DemonstrationSettings):
                    the YAML file's fields
    run_folder.py   RunFolder: the run folder's layout, stage markers and wall times (the one owner of the paths)
    stages.py       one function per stage: sft, sample, label, rm, ppo, dpo, rs, eval
    people.py       people beyond pairwise labels: demonstrations before SFT, conversation rounds, the chat format
    labelers.py     simulated labelers (noisy Bradley-Terry judges of a gold function, one careless), labeling
                    through the feedback store as people would
    runner.py       Pipeline / run_pipeline: the stages chained, rounds, stopping for people to label
    report.py       write_report: report.md / report.html and plots, from the run folder alone
"""
from alignloop.pipeline.config import (
    AIFeedbackSettings,
    DemonstrationSettings,
    EvalSettings,
    FeedbackSettings,
    PipelineConfig,
)
from alignloop.pipeline.report import write_report
from alignloop.pipeline.run_folder import RunFolder
from alignloop.pipeline.runner import Pipeline, run_pipeline

__all__ = ["AIFeedbackSettings", "DemonstrationSettings", "EvalSettings", "FeedbackSettings", "Pipeline",
           "PipelineConfig", "RunFolder",
           "run_pipeline", "write_report"]
