"""The whole loop as resumable stages in one run folder: SFT -> sample -> label -> reward model -> PPO (rounds), then
RLOO, GRPO and online DPO (when their sections are given), DPO, best-of-N, rejection sampling, evaluation and the
report.

    run_pipeline(PipelineConfig.from_yaml("pipeline.yaml"))     # `alignloop pipeline pipeline.yaml`

Several `rounds` repeat collect -> label -> reward model -> PPO, each round sampling from the previous round's PPO
policy and training the reward model on the preferences of all rounds so far (InstructGPT's loop). With people as
labelers the run stops after sampling (the project is ready in the app) and the same command continues once they
have judged. With thumbs feedback (`feedback.task_type: thumbs`) the rounds only collect and label (every round samples
from the SFT model), and KTO trains on the thumbs of all rounds: the reward model, PPO, DPO and rejection sampling
need pairs and are skipped. A `kto` section in a pairwise run trains KTO on the preferences, unpaired. RLOO, GRPO
and online DPO (`rloo:` / `grpo:` / `online_dpo:` sections) train the SFT model against the last round's reward
model, the KL to the SFT model, as PPO does (the gold scorer only watched).

AI feedback (the `ai_feedback:` section): an AI labeler judges each round's project beside the people (stage
round-N/judge; its labels are trained on when `feedback.labelers` is ai, ai+human or ai+simulated); SL-CAI fine-tunes
the SFT model on its own critiqued-and-revised samples (`ai_feedback.cai`), and RL-CAI trains `ai_feedback.rl` (PPO,
RLOO or GRPO) against a reward model of the AI labels alone, so both arms are evaluated next to the policies trained
on people's labels.
People beyond pairwise labels (`alignloop.pipeline.people`): a `demonstrations:` section starts the run with a
demonstration project; the run stops for people to write, and on resume SFT trains on their demonstrations.
`feedback.mode: conversation` makes each round a conversation project served with the round's policy; the run stops
for people to converse, and on resume the reward model trains on their per-turn choices. In conversation mode the
prompts PPO, the online trainers, rejection sampling and the evaluation sample from are rendered in the chat format
the app generated in (`people.chat_prompts`).
The layout of the run folder: `alignloop.pipeline.run_folder`; the stages: `alignloop.pipeline.stages`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from alignloop.data import prompt_texts
from alignloop.errors import ConfigError, UserError
from alignloop.pipeline import people, stages
from alignloop.pipeline.config import PipelineConfig
from alignloop.pipeline.report import write_report
from alignloop.pipeline.run_folder import RunFolder
from alignloop.training.loop import fsdp_asked

logging.getLogger("alembic").setLevel(logging.WARNING)


class Pipeline:
    """The run of one `PipelineConfig` in its run folder (`run`: a `RunFolder`, replaceable before `run_all`)."""

    def __init__(self, cfg: PipelineConfig, echo: Callable[[str], None] = print, run: RunFolder | None = None):
        self.cfg = cfg
        self.run = run if run is not None else RunFolder(cfg.output_dir, echo)
        self.echo = echo
        self.notes: list[str] = []
        all_prompts = prompt_texts(cfg.prompts)
        if cfg.eval_prompts is not None:
            self.train_prompts, self.eval_prompts = all_prompts, prompt_texts(cfg.eval_prompts)
        else:
            k = min(cfg.eval.num_prompts, max(1, len(all_prompts) // 4))
            self.train_prompts, self.eval_prompts = all_prompts[:-k], all_prompts[-k:]
        self.eval_prompts = self.eval_prompts[:cfg.eval.num_prompts]
        if not self.train_prompts:
            raise UserError("no training prompts")
        # as written: the openings of conversation rounds (the prompts sampled from are rendered in chat form then)
        self.plain_prompts, self.plain_eval_prompts = list(self.train_prompts), list(self.eval_prompts)

    def sft_model(self) -> str:
        trains_sft = self.cfg.sft is not None or self.cfg.demonstrations is not None
        return str(self.run.sft_model) if trains_sft else self.cfg.policy

    def run_all(self) -> dict:
        cfg, run = self.cfg, self.run
        refuse_under_fsdp(cfg)
        stopped = self._sft()
        if stopped:
            return stopped
        sft = self.sft_model()
        policy, rm, pref_files, ai_files = sft, None, [], []
        thumbs = cfg.feedback.task_type == "thumbs"
        if thumbs:
            self.notes.append("thumbs feedback: KTO trains on it; the reward model, PPO, DPO and rejection sampling "
                              "need preference pairs and were skipped (RLOO, GRPO and online DPO too: they train "
                              "against the reward model)")
        for r in range(1, cfg.rounds + 1):
            if r == 1 and cfg.preferences:
                pref_files.append(cfg.preferences)
            else:
                stopped = self._collect(r, policy, pref_files, ai_files)
                if stopped:
                    return stopped
            if thumbs:
                continue
            rm = run.stage(run.round_stage(r, "rm"),
                           lambda f, files=list(pref_files): stages.stage_rm(f, cfg, sft, files))["model"]
            if cfg.ppo is not None:
                policy = run.stage(run.round_stage(r, "ppo"), lambda f, policy=policy, rm=rm: stages.stage_ppo(
                    f, cfg, policy, rm, sft, self.train_prompts))["model"]
        policies = {"SFT": sft}
        if cfg.ppo is not None and run.done(run.round_stage(cfg.rounds, "ppo")):
            policies["PPO"] = policy
        for name, stage in run.ONLINE:   # RLOO, GRPO, online DPO: as PPO, the SFT model against the reward model
            if getattr(cfg, stage) is not None and not thumbs:
                policies[name] = run.stage(stage, lambda f, s=stage: stages.stage_online(
                    f, cfg, s, sft, rm, self.train_prompts))["model"]
        policies.update(self._constitutional(sft, ai_files))
        if cfg.dpo is not None and not thumbs:
            policies["DPO"] = run.stage(run.DPO, lambda f: stages.stage_dpo(f, cfg, sft, pref_files))["model"]
        if cfg.kto is not None or thumbs:
            policies["KTO"] = run.stage(run.KTO, lambda f: stages.stage_kto(f, cfg, sft, pref_files))["model"]
        if cfg.rejection_sampling is not None and not thumbs:
            policies["RS"] = run.stage(run.RS, lambda f: stages.stage_rs(f, cfg, sft, rm, self.train_prompts))["model"]
        results = run.stage(run.EVAL, lambda f: stages.stage_eval(f, cfg, run, policies, sft, rm, self.eval_prompts))
        write_report(run.root, notes=self.notes)
        return {"run": str(run.root), "sft": sft, "reward_model": rm, "policies": policies,
                "report": str(run.report_html), "results": results.get("summary", {}), "notes": self.notes}

    def _sft(self) -> dict | None:
        """People's demonstrations (the run stops once their project is made) and SFT; a dict when the run must
        stop. In conversation mode the prompts are then rendered in the SFT model's chat format."""
        cfg, run = self.cfg, self.run
        if cfg.demonstrations is not None:
            made_now = not run.done(run.DEMONSTRATIONS)
            info = run.stage(run.DEMONSTRATIONS, lambda f: people.stage_demonstrations(f, cfg, run, self.train_prompts))
            if made_now:   # people write in the app; running the same command again trains SFT on what they wrote
                return {"stopped": "human", "db": str(run.feedback_db), "project": info["project"],
                        "task": "demonstration"}
        if cfg.sft is not None or cfg.demonstrations is not None:
            run.stage(run.SFT, lambda f: stages.stage_sft(f, cfg, run))
        if people.conversation_mode(cfg):   # the policies trained on conversations are sampled as the app did
            sft = self.sft_model()
            self.train_prompts, self.eval_prompts = (people.chat_prompts(sft, self.plain_prompts),
                                                     people.chat_prompts(sft, self.plain_eval_prompts))
        return None

    def _collect(self, r: int, policy: str, pref_files: list[str], ai_files: list[str]) -> dict | None:
        """Sample and label round r (its preferences appended to `pref_files`, the AI labeler's alone to `ai_files`);
        a dict when the run must stop for people to label."""
        cfg, run = self.cfg, self.run
        if people.conversation_mode(cfg):
            return self._converse(r, policy, pref_files)
        run.stage(run.round_stage(r, "sample"),
                  lambda f: stages.stage_sample(f, cfg, run, r, policy, self.train_prompts))
        if cfg.ai_labels() and (r == 1 or cfg.ai_feedback.judge_all_rounds):
            run.stage(run.round_stage(r, "judge"), lambda f: stages.stage_judge(f, cfg, run, r, self.sft_model()))
        by_people = cfg.human_stop or "human" in cfg.feedback.labelers.split("+")
        if by_people and not run.done(run.round_stage(r, "label")) and not stages.has_judgements(run, r):
            # people label in the app; running the same command again continues from here
            return {"stopped": "human", "db": str(run.feedback_db), "project": run.project(r)}
        info = run.stage(run.round_stage(r, "label"), lambda f: stages.stage_label(f, cfg, run, r))
        pref_files.append(info["preferences"])
        if info.get("preferences_ai") and run.done(run.round_stage(r, "judge")):
            ai_files.append(info["preferences_ai"])
        return None

    def _converse(self, r: int, policy: str, pref_files: list[str]) -> dict | None:
        """Round r as a conversation project served with `policy` (its openings the plain training prompts); a
        dict when the run must stop for people to converse, else the round's pairs appended to `pref_files`."""
        cfg, run = self.cfg, self.run
        info = run.stage(run.round_stage(r, "sample"),
                         lambda f: people.stage_converse(f, cfg, run, r, policy, self.plain_prompts))
        if not run.done(run.round_stage(r, "label")) and not people.has_conversation_pairs(run, r):
            return {"stopped": "human", "db": str(run.feedback_db), "project": info["project"],
                    "task": "conversation"}
        info = run.stage(run.round_stage(r, "label"), lambda f: people.stage_conversation_label(f, cfg, run, r))
        pref_files.append(info["preferences"])
        return None

    def _constitutional(self, sft: str, ai_files: list[str]) -> dict[str, str]:
        """SL-CAI (the SFT model fine-tuned on its own revisions) and RL-CAI (a policy trained against a reward
        model of the AI labels alone), when the ai_feedback section asks for them."""
        cfg, run, ai = self.cfg, self.run, self.cfg.ai_feedback
        out: dict[str, str] = {}
        if ai is None:
            return out
        if ai.cai is not None:
            out["SL-CAI"] = run.stage(run.SL_CAI, lambda f: stages.stage_cai(f, cfg, sft, self.train_prompts))["model"]
        if ai.rl is not None:
            if not ai_files:
                raise UserError("ai_feedback.rl: no AI-labelled preferences (the AI labeler judged no round)")
            rm_ai = run.stage(run.RL_CAI_RM, lambda f: stages.stage_rm(f, cfg, sft, ai_files))["model"]
            start = out["SL-CAI"] if ai.rl_from == "sl_cai" else sft
            out["RL-CAI"] = run.stage(run.RL_CAI, lambda f: stages.stage_rl_cai(f, cfg, start, rm_ai,
                                                                                self.train_prompts))["model"]
        return out


def stages_not_under_fsdp(cfg: PipelineConfig) -> list[str]:
    """The configured stages that refuse FSDP (their trainers' rollout, reference and value passes are not written
    for sharded parameters: PPO, RLOO, GRPO, online DPO, RL-CAI), by config section."""
    names = []
    if cfg.feedback.task_type != "thumbs":  # thumbs feedback skips them anyway
        names += [s for s in ("ppo", RunFolder.RLOO, RunFolder.GRPO, RunFolder.ONLINE_DPO)
                  if getattr(cfg, s, None) is not None]
    if cfg.ai_feedback is not None and cfg.ai_feedback.rl is not None:
        names.append(f"ai_feedback.rl ({cfg.ai_feedback.rl})")
    return names


def refuse_under_fsdp(cfg: PipelineConfig) -> None:
    """Launched under FSDP: refuse up front a pipeline with stages that cannot run under it, naming them, instead of
    training SFT and the reward model and stopping at the first of them."""
    names = stages_not_under_fsdp(cfg) if fsdp_asked() else []
    if names:
        raise ConfigError(f"launched under FSDP, but these stages do not run under FSDP yet: {', '.join(names)}; "
                          f"launch the pipeline with DDP (accelerate launch --multi_gpu) or set these sections to null")


def run_pipeline(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> dict:
    return Pipeline(cfg, echo).run_all()
