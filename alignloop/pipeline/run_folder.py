"""The run folder: the one owner of its layout. The pipeline writes through it, the report and the demo read through
it; nothing else spells these paths.

    run = RunFolder("runs/demo")
    run.stage("round-1/rm", fn)        # fn(folder) -> info; skipped (info re-read) when its STAGE_DONE.json exists
    run.rm_model(1), run.preferences(1), run.results(), run.eval_samples("PPO"), run.report_html, ...

Layout:
    stages.json                         wall time of every finished stage
    data/, base/final                   the demo's generated data and pretrained base model (demo only)
    demo.json                           the demo's sizes and seed (demo only; `--resume` reads it)
    demonstrations/                     the demonstration project's creation (the `demonstrations` section):
                                        prompts.jsonl (what people write for, with the sampled answer to edit)
    sft/final                           the SFT model (when the run fine-tunes one); sft/train_rows.jsonl (what it
                                        trained on, people's demonstrations first, when there are any)
    feedback.db                         the feedback store: one project per round (round-1, round-2, ...) and the
                                        demonstration project (demonstrations)
    round-N/sample/samples.jsonl        completions imported into the store (conversation mode: the openings)
    round-N/judge/                      the AI labeler's judging of the round's project (ai_feedback; its summary)
    round-N/label/quality.json          labeler statistics, flags, agreement (conversation mode: counts and the mean
                                        rating); preferences.jsonl (the export: pairs (conversation mode: one per
                                        chosen turn), or unpaired {prompt, completion, label} rows of a thumbs project);
                                        preferences_ai.jsonl (the AI labeler's pairs alone, for RL-CAI)
    round-N/rm/final                    the reward model (heldout_preferences.jsonl: its held-out pairs)
    round-N/ppo/final                   the PPO policy (metrics.jsonl: its training curve)
    rloo/final, grpo/final, online_dpo/final   RLOO, GRPO and online DPO (metrics.jsonl: their training curves)
    dpo/final, kto/final, rs/final      DPO, KTO and rejection-sampling policies
    sl_cai/                             SL-CAI: revisions.jsonl, chains.jsonl (critique -> revision), sft/final
    rl_cai/rm/final, rl_cai/policy/final   RL-CAI: the reward model on AI labels and the policy trained against it
    eval/results.json                   the evaluation; eval/samples_<name>.jsonl, samples_reference.jsonl
    report.md, report.html, plots/      the report
Each stage folder ends with STAGE_DONE.json (its outputs and wall time): a stage whose marker exists is skipped, so
running the same command again resumes after the last finished stage.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from alignloop.data import read_rows

DONE = "STAGE_DONE.json"


class RunFolder:
    """Paths of a run folder, its stage markers and wall times. `stage(name, fn)` runs fn(folder) unless done.
    Stage names: the constants below, and `round_stage(r, step)` for a round's sample / label / rm / ppo."""

    DATA, BASE, SFT, DPO, KTO, RS, EVAL = "data", "base", "sft", "dpo", "kto", "rs", "eval"
    DEMONSTRATIONS = "demonstrations"   # the stage, and the store's project, of people's demonstrations
    RLOO, GRPO, ONLINE_DPO = "rloo", "grpo", "online_dpo"
    SL_CAI, RL_CAI_RM, RL_CAI = "sl_cai", "rl_cai/rm", "rl_cai/policy"   # Constitutional AI (the ai_feedback section)
    ONLINE = (("RLOO", RLOO), ("GRPO", GRPO), ("Online DPO", ONLINE_DPO))   # evaluated name, stage: SFT vs the RM

    def __init__(self, root: str | Path, echo: Callable[[str], None] = print, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    # -- stages
    def path(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return (self.root / stage / DONE).exists()

    def info(self, stage: str) -> dict | None:
        """The marker of a finished stage (its outputs and wall time); None when it has not finished."""
        p = self.root / stage / DONE
        return json.loads(p.read_text()) if p.exists() else None

    def stage(self, name: str, fn: Callable[[Path], dict]) -> dict:
        folder = self.root / name
        if self.done(name):
            info = self.info(name)
            self.echo(f"[{name}] done already ({info.get('seconds', 0):.0f}s): skipped")
            return info
        folder.mkdir(parents=True, exist_ok=True)
        self.echo(f"[{name}] ...")
        t0 = time.perf_counter()
        info = fn(folder) or {}
        info["seconds"] = time.perf_counter() - t0
        write_json(folder / DONE, info)
        times = self.timings()
        times[name] = info["seconds"]
        write_json(self.stages_file, times)
        self.echo(f"[{name}] finished in {info['seconds']:.1f}s")
        return info

    def timings(self) -> dict[str, float]:
        return json.loads(self.stages_file.read_text()) if self.stages_file.exists() else {}

    @property
    def stages_file(self) -> Path:
        return self.root / "stages.json"

    # -- the demo's own stages
    @property
    def data_dir(self) -> Path:
        return self.root / self.DATA

    @property
    def base_model(self) -> Path:
        return self.root / self.BASE / "final"

    @property
    def demo_state(self) -> Path:
        return self.root / "demo.json"

    # -- collection rounds
    @property
    def sft_model(self) -> Path:
        return self.root / self.SFT / "final"

    @property
    def sft_rows(self) -> Path:
        """The rows the SFT stage trained on (written when people's demonstrations are among them)."""
        return self.root / self.SFT / "train_rows.jsonl"

    @property
    def demonstration_prompts(self) -> Path:
        return self.root / self.DEMONSTRATIONS / "prompts.jsonl"

    @property
    def feedback_db(self) -> Path:
        return self.root / "feedback.db"

    @staticmethod
    def round_stage(round_: int, step: str) -> str:
        """The stage name of a round's step: sample, judge, label, rm or ppo."""
        return f"round-{round_}/{step}"

    @staticmethod
    def project(round_: int) -> str:
        """The feedback-store project of a round."""
        return f"round-{round_}"

    def rounds(self) -> int:
        """How many rounds have a folder (1, 2, ... with no gap)."""
        n = 0
        while (self.root / f"round-{n + 1}").exists():
            n += 1
        return n

    def samples(self, round_: int) -> Path:
        return self.path(self.round_stage(round_, "sample")) / "samples.jsonl"

    def quality(self, round_: int) -> Path:
        return self.path(self.round_stage(round_, "label")) / "quality.json"

    def preferences(self, round_: int) -> Path:
        return self.path(self.round_stage(round_, "label")) / "preferences.jsonl"

    def preferences_ai(self, round_: int) -> Path:
        return self.path(self.round_stage(round_, "label")) / "preferences_ai.jsonl"

    def rm_dir(self, round_: int) -> Path:
        return self.path(self.round_stage(round_, "rm"))

    def rm_model(self, round_: int) -> Path:
        return self.rm_dir(round_) / "final"

    def ppo_dir(self, round_: int) -> Path:
        return self.path(self.round_stage(round_, "ppo"))

    # -- after the rounds
    @property
    def dpo_dir(self) -> Path:
        return self.root / self.DPO

    @property
    def eval_dir(self) -> Path:
        return self.root / self.EVAL

    @property
    def results_file(self) -> Path:
        return self.eval_dir / "results.json"

    def results(self) -> dict:
        return read_json(self.results_file) or {}

    def eval_samples(self, name: str) -> Path:
        """Evaluation samples of a policy ("SFT", "PPO", "best-of-4", ...) or of the reference ("reference")."""
        return self.eval_dir / f"samples_{name.replace(' ', '_')}.jsonl"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"


def write_json(path: Path, obj) -> None:
    """Written aside and renamed into place: a marker cut off mid-write would make resume stop on bad JSON."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path):
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.exists() else None



def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file of the run (metrics, samples); missing file: none. A run may still be appending to
    it, so a line that does not parse (a partly written last line) is skipped (`alignloop.data.read_rows`)."""
    return read_rows(path, skip_bad_rows=True) if path.exists() else []
