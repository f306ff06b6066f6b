"""Reward-model training: an LM backbone with a scalar head, trained on preference pairs or rankings.

    RewardTrainer(model="path", args=RewardConfig(output_dir="runs/rm"), train_dataset="pairs.jsonl").train()
    alignloop rm --model path --train-file pairs.jsonl --output-dir runs/rm

One batch element is one prompt's *group* of comparisons: a plain pair, all K(K-1)/2 pairs of a ranking of K, each
pair weighted 1/C(K,2) (InstructGPT), so a prompt with many completions does not dominate, or flat pairs that share a
`group` (each with its `pair_weight`). Each distinct completion of a group is tokenised and scored once
(`tokenize_rankings`: one truncation per group, the prompt cut to fit the longest completion, so a completion has one
score whichever pair it is in), K forward sequences for a ranking, not K(K-1).

Losses (pure functions in alignloop.losses):
  bradley_terry: -log σ(r_chosen - r_rejected - margin); a tie pair (include_ties) gets the symmetric
                 ½[-log σ(d) - log σ(-d)], which pulls the two scores together.
  plackett_luce: listwise NLL of the ranking the labeler gave (its ranks, not an order rebuilt from the pairs); tied
                 completions are left out of each other's denominators (no order asserted between them).
  best_of_k:     Ziegler et al. 2019: -log softmax over the group's K completions at the one ranked first (best-of-K
                 rows `best`, or a ranking's first place; the order below it is not used). Tied firsts: one term each,
                 the other tied firsts left out of its softmax (the tie model of plackett_luce).
  The listwise losses apply to groups with a ranking of 3 or more completions, one term per group (weight 1);
  a single pair (where both reduce to Bradley-Terry) and flat pairs without a ranking train pairwise, as above.
The loss of a global batch is Σ_groups loss / (number of groups in the global batch), identical whatever the split
into processes and accumulation steps. The score is read at each sequence's last real token.

Several heads (`heads_by` criterion | group | labeler; see `alignloop.models.reward` for the saved format): one score
per head on a shared backbone, scores [N, H]. A group's labeler context (`PreferenceGroup.meta`: its criterion, its
labeler's `labeler_attributes["group"]`, or its labeler) names its head; with `population_head`, a head named
"population" trains on every pair too (the cold-start model of a user nobody knows). The loss above is computed for
every head, [P, H] (or [G, H] listwise), then masked (`head_mask`, [G, H]): a group's loss is the sum of its own head's
and the population head's terms, so a head's row of the `score` weight gets gradient only from its own pairs (and
the shared backbone from all). A group whose context does not name a head (no such column, a consensus row without
one labeler, or a name outside `heads`) trains the population head alone; without a population head it is an error
naming the row. Metrics: accuracy of each pair on its own head (`eval/accuracy`) and of each head on its pairs
(`eval/accuracy/<head>`).

Shapes: G = groups in a micro-batch, N = distinct sequences in it, T = padded length, P = pairs, K = completions,
H = heads (1 without heads_by).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from alignloop.data import DataError, RankingCollator, load_preferences, meta_key, tokenize_rankings
from alignloop.errors import ConfigError
from alignloop.losses import best_of_k_loss, bradley_terry_loss, center_rewards_penalty, plackett_luce_loss
from alignloop.models import POPULATION_HEAD, RewardModel
from alignloop.models.fast import disable_dropout, speed_up
from alignloop.training import global_batches, optimizer_step, sync_context
from alignloop.training.fsdp import even_micro_batches
from alignloop.training.run import (
    TrainingArgs,
    TrainResult,
    build_lora,
    checkpoint_if_due,
    eval_due,
    finish,
    prepare_run,
    resolve_tokenizer,
    setup_optimization,
    train_and_eval_examples,
)


@dataclass
class RewardConfig(TrainingArgs):
    """Reward-model settings (plus the shared `TrainingArgs` fields)."""
    model: str = field(default="", metadata={
        "help": "Starting point: a causal LM (e.g. the SFT model; a scalar head is added) or a sequence classifier "
                "with one output, as a hub id or a local folder."})
    train_file: str | None = field(default=None, metadata={
        "help": "Preferences: prompt/chosen/rejected [+margin or strength] (TRL format, conversational too; rows "
                "sharing a `group` train together, each weighted by its `pair_weight`), rankings "
                "prompt/completions/ranking, or best-of-K prompt/completions/best."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out preferences (same formats)."})
    output_dir: str = field(default="runs/rm", metadata={"help": "Where checkpoints, metrics and the final model go."})
    loss: Literal["bradley_terry", "plackett_luce", "best_of_k"] = field(default="bradley_terry", metadata={
        "help": "bradley_terry (pairwise, with margins), plackett_luce (listwise over a ranking's order; tied "
                "completions unordered) or best_of_k (Ziegler et al.: softmax over the K completions for the one "
                "ranked first). The listwise losses apply to rankings of 3 or more; other groups train pairwise."})
    use_margin: bool = field(default=True, metadata={
        "help": "Subtract each pair's margin (from the data's margin or strength) inside the Bradley-Terry loss."})
    include_ties: bool = field(default=False, metadata={
        "help": "Keep tied pairs and train their scores towards equality in the pairwise loss (default: skip them); "
                "the listwise losses take ties from the ranking itself."})
    strength_margins: Literal["small", "large"] = field(default="small", metadata={
        "help": "Llama 2's table turning a strength label into a margin: small (1, 2/3, 1/3, 0) or large "
                "(3, 2, 1, 0)."})
    add_eos: bool = field(default=True, metadata={
        "help": "Append EOS to every completion, so the score is read at the same kind of token everywhere."})
    center_rewards_coefficient: float = field(default=0.0, metadata={
        "help": "Add coef·mean((r_chosen + r_rejected)²) to keep scores centred near 0 without shrinking their gaps "
                "(Eisenstein et al. 2023, as TRL); 0 disables."})
    disable_dropout: bool = field(default=True, metadata={
        "help": "Set every dropout probability of the model to 0 (as TRL's RewardTrainer does by default): the score "
                "of a completion no longer depends on a random mask."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW."})
    heads_by: Literal["none", "criterion", "group", "labeler"] = field(default="none", metadata={
        "help": "One head per criterion (the rows' `criterion`), labeler group (`labeler_attributes.group`) or "
                "labeler (`labeler`) on a shared backbone; each pair trains its own head. none: one head."})
    population_head: bool = field(default=False, metadata={
        "help": "With heads_by: an extra head named 'population' trained on every pair (the cold-start score); "
                "pairs whose row names no head (or one outside `heads`) train it alone."})
    heads: list[str] | None = field(default=None, metadata={
        "help": "With heads_by: the heads, in this order (default: the sorted names in the training data)."})


# ---------------------------------------------------------------- pieces
LISTWISE = ("plackett_luce", "best_of_k")
# what the loss reads of a RankingCollator batch (labels and position ids stay on the host)
BATCH_KEYS = ("input_ids", "attention_mask", "chosen_index", "rejected_index", "margin", "pair_weight", "tie",
              "pair_group_index", "order", "ranks", "valid")


def best_of_k_terms(scores: torch.Tensor, valid: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """`best_of_k_loss` of each group [G] from its scores best first [G, K] (`valid`, `ranks` as a RankingCollator
    gives them): the pick is the completion ranked first; tied firsts each give a term with the other tied firsts
    left out of the softmax."""
    first = valid & (ranks == ranks[:, :1])
    group, pick = first.nonzero(as_tuple=True)
    others = first[group] & (torch.arange(scores.shape[1], device=scores.device) != pick[:, None])
    terms = best_of_k_loss(scores[group], pick, valid[group] & ~others)
    return scores.new_zeros(scores.shape[0]).index_add(0, group, terms)


# what a row needs for each heads_by (the labeler context of the data contract, `alignloop.data.META_COLUMNS`)
HEAD_COLUMNS = {"criterion": "a `criterion`", "group": "`labeler_attributes` with a \"group\"",
                "labeler": "a `labeler`"}


def plan_heads(args: RewardConfig, examples: list[dict]) -> dict[str, Any] | None:
    """The heads of a run ({"by", "names", "population"}, as `alignloop.models.check_heads` takes them), or None
    without heads_by: `args.heads`, or the sorted names the tokenised groups' meta gives (`meta_key`), then the
    population head last."""
    if args.heads_by == "none":
        if args.heads or args.population_head:
            raise ConfigError("heads / population_head: set heads_by (criterion, group or labeler) to train heads")
        return None
    found = {meta_key(e.get("meta", {}), args.heads_by) for e in examples} - {None}
    names = list(args.heads) if args.heads else sorted(found)
    if not names:
        raise ConfigError(f"heads_by={args.heads_by}: no row of the training data has {HEAD_COLUMNS[args.heads_by]}, "
                          f"so there is no head to train")
    if args.population_head:
        if POPULATION_HEAD in names:
            raise ConfigError(f"heads: {POPULATION_HEAD!r} names the population head (population_head=True); "
                              f"rename that {args.heads_by}")
        names.append(POPULATION_HEAD)
    if len(set(names)) != len(names):
        raise ConfigError(f"heads: names must be distinct, got {names}")
    return {"by": args.heads_by, "names": names, "population": POPULATION_HEAD if args.population_head else None}


def assign_heads(examples: list[dict], heads: dict[str, Any], what: str) -> int:
    """Set each tokenised group's own head (`"head"`: an index into heads["names"]) from its meta. A group whose meta
    names no head, or one outside the heads, gets the population head; without one that is a DataError (a missing
    column was already refused row by row when reading). Returns how many groups train the population head alone."""
    names, population = heads["names"], heads["population"]
    alone = 0
    for e in examples:
        key = meta_key(e.get("meta", {}), heads["by"])
        if key in names and key != population:
            e["head"] = names.index(key)
            continue
        if population is None:
            raise DataError(f"{what}: {heads['by']} {key!r} is not one of the heads {names}: add it to `heads`, or "
                            f"train a population head (population_head=True) for the pairs of unknown {heads['by']}s")
        e["head"] = names.index(population)
        alone += 1
    return alone


def head_accuracies(per_head: torch.Tensor, heads: dict[str, Any] | None) -> dict[str, float]:
    """`eval/accuracy/<head>` of each head with pairs, from per_head [2, H] (correct, pairs of each head)."""
    return {f"eval/accuracy/{name}": (per_head[0, h] / per_head[1, h]).item()
            for h, name in enumerate(heads["names"] if heads else ()) if per_head[1, h] > 0}


def head_mask(group_head: torch.Tensor, num_heads: int, population: int | None) -> torch.Tensor:
    """Which heads each group trains [G, H] bool: its own head `group_head` [G] (an index) and the population
    head (an index, or None)."""
    mask = torch.nn.functional.one_hot(group_head, num_heads).bool()
    if population is not None:
        mask[:, population] = True
    return mask


def _masked_sum(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not a product with the mask: a head outside the mask gets an exact zero gradient even from an infinite
    # term (a NaN score would poison the shared backbone anyway), and its loss is not counted
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(-1)


def group_losses(scores: torch.Tensor, batch: dict[str, torch.Tensor], loss_type: str,
                 use_margin: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of each group [G] from the scores of the distinct completions of a `RankingCollator` batch, [N] (one
    head) or [N, H] with `batch["head_mask"]` [G, H] (the heads each group trains; `head_mask`), plus per-pair
    statistics for accuracy and margin metrics over non-tie pairs (`diff` [P] on each pair's own head
    `batch["group_head"]`, `diffs` [P, H] and `pair_heads` [P, H] for per-head metrics) and each group's centring term
    `center` [G] (its pairs' (r_c + r_r)², weighted as the group's pairs are: for one pair per group, their mean is
    TRL's term). Pairwise: Σ_pairs pair_weight · loss. Listwise (`LISTWISE`): a group with a ranking of 3 or more
    completions takes the listwise term instead; the others stay pairwise. With several heads each term is summed
    over the group's heads."""
    one_head = scores.dim() == 1
    scores = scores[:, None] if one_head else scores                        # [N, H]
    n_groups, group = batch["valid"].shape[0], batch["pair_group_index"]
    gmask = (torch.ones(n_groups, 1, dtype=torch.bool, device=scores.device) if one_head
             else batch["head_mask"])                                       # [G, H]
    pmask = gmask[group]                                                    # [P, H]
    c, r = scores[batch["chosen_index"]], scores[batch["rejected_index"]]   # [P, H]
    w, tie = batch["pair_weight"], batch["tie"]
    bt = bradley_terry_loss(c, r, batch["margin"][:, None] if use_margin else None)
    # ties: symmetric loss pulls the two scores together
    sym = 0.5 * (bradley_terry_loss(c, r) + bradley_terry_loss(r, c))
    pair_terms = _masked_sum(torch.where(tie[:, None], sym, bt), pmask)   # [P]
    losses = scores.new_zeros(n_groups).index_add(0, group, w * pair_terms)
    center = scores.new_zeros(n_groups).index_add(0, group, w * _masked_sum(center_rewards_penalty(c, r), pmask))
    if loss_type in LISTWISE:
        rows = (batch["valid"].sum(-1) >= 3).nonzero(as_tuple=True)[0]
        if len(rows):
            valid, ranks = batch["valid"][rows], batch["ranks"][rows]
            s = scores[batch["order"][rows]]                                # [R, K, H]
            term = torch.stack([plackett_luce_loss(s[..., h], valid, ranks) if loss_type == "plackett_luce"
                                else best_of_k_terms(s[..., h], valid, ranks) for h in range(s.shape[-1])], -1)
            losses = losses.index_copy(0, rows, _masked_sum(term, gmask[rows]))
    diffs = (c - r).detach()
    own = torch.zeros_like(group) if one_head else batch["group_head"][group]
    return losses, {"diff": diffs.gather(1, own[:, None])[:, 0], "diffs": diffs, "pair_heads": pmask, "tie": tie,
                    "center": center}


class RewardTrainer:
    """`RewardTrainer(model=..., args=RewardConfig(...), train_dataset=..., eval_dataset=...).train()`.

    model: a hub id / local folder (a causal LM gets a fresh scalar head, a 1-output classifier is used as is), or
    an `alignloop.models.RewardModel` (then pass `tokenizer`). Datasets: a path or hub id, a list of dicts, or a
    `datasets.Dataset`; default: the config's train_file / eval_file."""

    def __init__(self, model: Any = None, args: RewardConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, tokenizer: Any = None):
        self.args = args or RewardConfig()
        self.model_arg = model if model is not None else self.args.model
        self.train_source = train_dataset if train_dataset is not None else self.args.train_file
        self.eval_source = eval_dataset if eval_dataset is not None else self.args.eval_file
        self.tokenizer = tokenizer
        if not self.model_arg:
            raise ConfigError("model: give a hub id or a local folder (RewardConfig.model / --model)")
        if self.train_source is None:
            raise ConfigError("train_file: give the preferences to train on (--train-file)")

    def _tokenize(self, source, tokenizer):
        a = self.args
        groups, stats = load_preferences(source, tokenizer=tokenizer, include_ties=a.include_ties,
                                         margins=a.strength_margins, skip_bad_rows=a.skip_bad_rows)
        if a.heads_by != "none" and not a.population_head:
            # each pair must name its head; refused here, where the row is still known
            for g in groups:
                if meta_key(g.meta, a.heads_by) is None:
                    raise DataError(f"{g.where or source}: heads_by={a.heads_by} needs {HEAD_COLUMNS[a.heads_by]} in "
                                    f"every row (or population_head=True: such pairs then train the population head "
                                    f"alone)")
        tokenized, tstats = tokenize_rankings(groups, tokenizer, max_length=a.max_length, truncation=a.truncation,
                                              add_eos=a.add_eos)
        return [g for g in tokenized if g["pairs"]], stats, tstats  # all tied (ties skipped): nothing to learn

    def _model(self, heads: dict[str, Any] | None) -> torch.nn.Module:
        """The model to train: given, or loaded (a causal LM gets fresh heads); its heads must be the run's."""
        a = self.args
        model = self.model_arg if isinstance(self.model_arg, torch.nn.Module) else RewardModel.from_pretrained(
            self.model_arg, dtype=a.dtype, lora=build_lora(a), gradient_checkpointing=a.gradient_checkpointing,
            trust_remote_code=a.trust_remote_code, heads=heads)
        if isinstance(model, RewardModel) and model.heads != heads:
            raise ConfigError(f"the model's heads ({model.heads or 'one head'}) are not the run's "
                              f"({heads or 'one head: heads_by none'})")
        return model

    def train(self) -> TrainResult:
        a = self.args
        run = prepare_run(a, "rm")
        acc = run.accelerator
        tokenizer = resolve_tokenizer(self.model_arg, self.tokenizer, padding_side="right")
        # each example: one group, each distinct completion once (tokenize_rankings)
        train_ex, eval_ex, stats, tstats = train_and_eval_examples(
            lambda source: self._tokenize(source, tokenizer), self.train_source, self.eval_source, a, "pairs")
        run.log.info("%s; %s; %d groups, %d pairs", stats.summary(), tstats.summary(), len(train_ex),
                     sum(len(e["pairs"]) for e in train_ex))
        heads = plan_heads(a, train_ex)
        if heads is not None:
            alone = assign_heads(train_ex, heads, "training data") + assign_heads(eval_ex or [], heads, "eval data")
            run.log.info("heads by %s: %s; %d groups train the population head alone", heads["by"],
                         ", ".join(heads["names"]), alone)
        population = heads["names"].index(heads["population"]) if heads and heads["population"] else None
        n_heads = len(heads["names"]) if heads else 1

        # ---- model, optimizer, schedule
        model = self._model(heads)
        speed_up(model)  # same function, faster kernels
        if a.disable_dropout:
            disable_dropout(model)
        opt = setup_optimization(a, run, model, len(train_ex), "rm")
        model, optimizer, scheduler = opt.model, opt.optimizer, opt.scheduler
        logger, progress = opt.logger, opt.progress
        global_batch, per_epoch, total = opt.global_batch, opt.per_epoch, opt.total
        step, epoch, pos = opt.step, opt.epoch, opt.pos
        # a multiple of 8: fewer distinct shapes (oneDNN builds a kernel per new matmul shape, ~1 ms each)
        collate = RankingCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)

        def forward(examples: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            batch = collate(examples)
            b = {k: batch[k].to(acc.device) for k in BATCH_KEYS}
            if heads is None:
                scores = model(b["input_ids"], b["attention_mask"]).float()                     # [N]
            else:
                scores = model(b["input_ids"], b["attention_mask"], all_heads=True).float()     # [N, H]
                b["group_head"] = torch.tensor([e["head"] for e in examples], device=acc.device)
                b["head_mask"] = head_mask(b["group_head"], scores.shape[1], population)
            return group_losses(scores, b, a.loss, a.use_margin)

        def evaluate() -> dict[str, float]:
            model.eval()
            sums = torch.zeros(4, device=acc.device)  # loss, groups, correct, margin sum; pairs counted below
            n_pairs = torch.zeros((), device=acc.device)
            per_head = torch.zeros(2, n_heads, device=acc.device)  # correct, pairs of each head
            # the same number of forwards on every process (FSDP's forward is a collective); dummies are not counted
            micro = even_micro_batches(list(range(len(eval_ex))), acc.process_index, acc.num_processes,
                                       a.per_device_batch_size)
            with torch.no_grad():
                for mb, w in micro:
                    losses, ps = forward([eval_ex[i] for i in mb])
                    if not w:
                        continue
                    real = ~ps["tie"]
                    sums += torch.stack([losses.sum(), torch.tensor(float(len(mb)), device=acc.device),
                                         (ps["diff"][real] > 0).float().sum(), ps["diff"][real].sum()])
                    n_pairs += real.sum()
                    counted = ps["pair_heads"] & real[:, None]
                    per_head += torch.stack([(counted & (ps["diffs"] > 0)).sum(0), counted.sum(0)]).float()
            model.train()
            sums, n_pairs = acc.reduce(sums, "sum"), acc.reduce(n_pairs, "sum").clamp(min=1)
            per_head = acc.reduce(per_head, "sum")
            return {"eval/loss": (sums[0] / sums[1].clamp(min=1)).item(),
                    "eval/accuracy": (sums[2] / n_pairs).item(), "eval/margin": (sums[3] / n_pairs).item(),
                    "eval/pairs": n_pairs.item(), **head_accuracies(per_head, heads)}

        # ---- train
        model.train()
        t0, window, acc_window = time.perf_counter(), [], []
        last_eval: dict[str, float] = {}
        stream = global_batches(len(train_ex), global_batch, a.seed, epoch=epoch, batch_in_epoch=pos)
        for epoch, pos, batch, epoch_end in stream:
            if step >= total:
                break
            # as many micro-batches on every process (a short last batch: dummies of weight 0, zero gradient)
            micro = even_micro_batches(batch, acc.process_index, acc.num_processes, a.per_device_batch_size)
            loss_sum = torch.zeros((), device=acc.device)
            correct = torch.zeros(2, device=acc.device)
            for k, (mb, w) in enumerate(micro):
                with sync_context(acc, model, k, len(micro)), acc.autocast():
                    losses, ps = forward([train_ex[i] for i in mb])
                    loss = losses.sum() / len(batch)
                    if a.center_rewards_coefficient:
                        loss = loss + a.center_rewards_coefficient * ps["center"].sum() / len(batch)
                    loss = loss * w
                    acc.backward(loss * acc.num_processes)  # DDP and FSDP average over processes
                loss_sum += loss.detach()
                real = ~ps["tie"]
                correct += torch.stack([(ps["diff"][real] > 0).float().sum(), real.float().sum()]) * w
            grad_norm = optimizer_step(acc, model, optimizer, scheduler, a.max_grad_norm)
            step += 1
            window.append(acc.reduce(loss_sum, "sum").item())
            c = acc.reduce(correct, "sum")
            acc_window.append((c[0] / c[1].clamp(min=1)).item())
            progress.update(1, info=f"loss {window[-1]:.4f}")
            if step % a.logging_steps == 0 or step == total:
                logger.log({"loss/rm": sum(window) / len(window), "train/accuracy": sum(acc_window) / len(acc_window),
                            "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                            "train/epoch": epoch + pos / per_epoch,
                            "perf/groups_per_sec": step * global_batch / max(time.perf_counter() - t0, 1e-9)}, step)
                window, acc_window = [], []
            if eval_ex and eval_due(a, step, epoch_end):
                last_eval = evaluate()
                logger.log(last_eval, step)
            checkpoint_if_due(a, acc, step, epoch, pos, epoch_end, {"model": model}, optimizer, scheduler,
                              run.config_dict)
        if eval_ex and not last_eval:
            last_eval = evaluate()
            logger.log(last_eval, step)
        return finish(a, acc, model, tokenizer, logger, progress, step, last_eval, time.perf_counter() - t0,
                      stats, tstats)
