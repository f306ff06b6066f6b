"""Chat templates: prompt with the generation prompt, completion = the rest of the rendered conversation."""
import json

import pytest

from alignloop.data import DataError, load_preferences, load_sft, tokenize_sft

U = {"role": "user", "content": "is the movie good"}
A1 = {"role": "assistant", "content": "yes it is"}
U2 = {"role": "user", "content": "and the plot"}
A2 = {"role": "assistant", "content": "the plot is boring"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_rendered_prompt_and_completion(tmp_path, chat_tok):
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [U, A1, U2, A2]}])
    (rec,), _ = load_sft(path, tokenizer=chat_tok)
    assert rec["prompt"] == ("<|user|>is the movie good\n<|assistant|>yes it is\n<|user|>and the plot\n"
                             "<|assistant|>")
    assert rec["completion"] == "the plot is boring\n"
    full = chat_tok.apply_chat_template([U, A1, U2, A2], tokenize=False)
    assert rec["prompt"] + rec["completion"] == full
    # tokens of prompt + completion are those of the full conversation (plus the appended EOS); the last turn only
    (ex,), _ = tokenize_sft([rec], chat_tok, all_assistant_turns=False)
    assert ex["input_ids"] == chat_tok(full, add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    p = ex["prompt_length"]
    assert p == len(chat_tok(rec["prompt"], add_special_tokens=False)["input_ids"])
    assert ex["labels"][:p] == [-100] * p and ex["labels"][p:] == ex["input_ids"][p:]
    assert chat_tok.decode(ex["input_ids"][p:]) == "the plot is boring\n<|endoftext|>"


def test_conversational_preferences_and_tokenize_time_rendering(tmp_path, chat_tok):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": [U], "chosen": [A1], "rejected": [A2]},
                                         {"chosen": [U, A1], "rejected": [U, A2]}])
    groups, _ = load_preferences(path, tokenizer=chat_tok)
    for g in groups:
        assert g.prompt == "<|user|>is the movie good\n<|assistant|>"
        assert (g.pairs[0].chosen, g.pairs[0].rejected) == ("yes it is\n", "the plot is boring\n")
    # without a tokenizer at load time the records stay conversational; tokenisation renders them
    raw, _ = load_sft([{"prompt": [U], "completion": [A1]}])
    assert raw[0]["prompt"] == [U]
    (ex,), _ = tokenize_sft(raw, chat_tok, add_eos=False)
    assert chat_tok.decode(ex["input_ids"]) == "<|user|>is the movie good\n<|assistant|>yes it is\n"


def test_no_chat_template_is_a_clear_error(tmp_path, plain_tok):
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": [U, A1]}])
    with pytest.raises(DataError) as e:
        load_sft(path, tokenizer=plain_tok)
    assert "c.jsonl line 1" in str(e.value) and "no chat template" in str(e.value)
    raw, _ = load_sft(path)
    with pytest.raises(DataError, match="record 0: the data is conversational .* no chat template"):
        tokenize_sft(raw, plain_tok)
    # plain-text data needs no template
    assert load_sft([{"text": "a b"}], tokenizer=plain_tok)[0] == [{"prompt": "", "completion": "a b"}]


def test_template_that_cannot_separate_the_completion_is_a_bad_row(tmp_path):
    from alignloop.models.tiny import default_corpus, train_tokenizer

    odd = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'ASSISTANT NOW:' }}{% endif %}")
    tok = train_tokenizer(default_corpus(50), vocab_size=270, chat_template=odd)
    path = _jsonl(tmp_path / "o.jsonl", [{"messages": [U, A1]}])
    with pytest.raises(DataError, match="o.jsonl line 1: the chat template renders"):
        load_sft(path, tokenizer=tok)


def test_messages_without_assistant_and_bad_messages(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"messages": [U]}, {"messages": [{"role": "user"}]},
                                         {"messages": "hello"}])
    _, stats = load_sft(path, skip_bad_rows=True)
    assert stats.bad_rows == 3
    assert "b.jsonl line 1, field 'messages': expected at least one message with role 'assistant'" in stats.errors[0]
    assert "b.jsonl line 2, field 'messages': message 0 should be" in stats.errors[1]
    assert "b.jsonl line 3, field 'messages': expected a list of messages, got a string" in stats.errors[2]


def test_template_exception_is_a_bad_row(tmp_path):
    from alignloop.models.tiny import default_corpus, train_tokenizer

    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}"
              "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = train_tokenizer(default_corpus(50), vocab_size=270, chat_template=strict)
    path = _jsonl(tmp_path / "s.jsonl", [{"messages": [U, A1]},
                                         {"messages": [{"role": "system", "content": "x"}, U, A1]}])
    records, stats = load_sft(path, tokenizer=tok, skip_bad_rows=True)
    assert records == [{"prompt": "user: is the movie good\nassistant: ", "completion": "yes it is\n"}]
    assert stats.bad_rows == 1 and "s.jsonl line 2: the chat template failed" in stats.errors[0]
    assert "no system messages" in stats.errors[0]


# ChatML's shape: each turn closed by the end token (here the tokenizer's EOS, as Qwen's <|im_end|>) and a newline
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|endoftext|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_template_closed_turn_gets_no_second_eos(tmp_path):
    """The template already ends the assistant turn with EOS + newline: appending EOS again trained on
    `<|endoftext|>\\n<|endoftext|>`. The tokens are the rendered conversation's, no more, in SFT, in preference pairs
    and in what a reward model scores; a plain completion still gets its EOS."""
    from alignloop.data import reward_input_ids, tokenize_preferences
    from alignloop.models.tiny import default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(200), vocab_size=300, chat_template=CHATML)
    eos = tok.eos_token_id
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [U, A1, U2, A2]}])
    (rec,), _ = load_sft(path, tokenizer=tok)
    assert rec["completion"] == "the plot is boring<|endoftext|>\n"
    (ex,), _ = tokenize_sft([rec], tok)
    full = tok.apply_chat_template([U, A1, U2, A2], tokenize=False)
    assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][-2:] == [eos, tok("\n", add_special_tokens=False)["input_ids"][0]]
    pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": [U], "chosen": [A1], "rejected": [A2]}])
    (group,), _ = tokenize_preferences(load_preferences(pref, tokenizer=tok)[0], tok)
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert group["pairs"][0][key].count(eos) == 2, key          # the user turn's and the assistant turn's
    closed, plain_rm = reward_input_ids(tok, ["q", "q"], ["an answer<|endoftext|>\n", "an answer"])
    assert closed.count(eos) == 1 and plain_rm[-1] == eos             # a plain completion still gets its EOS
    (plain,), _ = tokenize_sft([{"prompt": "q", "completion": "a b"}], tok)
    assert plain["input_ids"][-1] == eos


def test_a_row_can_keep_eos_off_its_completion(tmp_path):
    """`add_eos: false` on an SFT row (JSONL bool, CSV text) keeps EOS off that completion only; a bad value names the
    file, line and field."""
    from alignloop.models.tiny import default_corpus, train_tokenizer

    tok = train_tokenizer(default_corpus(200), vocab_size=300)
    eos = tok.eos_token_id
    path = _jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "completion": "a cut", "add_eos": False},
                                         {"prompt": "q", "completion": "a whole answer"}])
    cut, whole = tokenize_sft(load_sft(path)[0], tok)[0]
    assert cut["input_ids"][-1] != eos and whole["input_ids"][-1] == eos
    csv = tmp_path / "s.csv"
    csv.write_text("prompt,completion,add_eos\nq,a cut,false\nq,a whole answer,true\n")
    cut, whole = tokenize_sft(load_sft(csv)[0], tok)[0]
    assert cut["input_ids"][-1] != eos and whole["input_ids"][-1] == eos
    bad = _jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "x", "add_eos": "maybe"}])
    with pytest.raises(DataError, match=r"b.jsonl line 1, field 'add_eos': expected true or false"):
        load_sft(bad)



def test_every_assistant_turn_is_a_target_by_default(tmp_path, chat_tok):
    """A conversation trains every assistant turn (TRL's assistant-only loss), each as the template writes it after
    its generation prompt; user turns and generation prompts stay masked. Same tokens either way."""
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [U, A1, U2, A2]}])
    (rec,), _ = load_sft(path, tokenizer=chat_tok)
    (every,), _ = tokenize_sft([rec], chat_tok)
    (last,), _ = tokenize_sft([rec], chat_tok, all_assistant_turns=False)
    assert every["input_ids"] == last["input_ids"]

    def targets(ex):
        runs, cur = [], []
        for tok, lab in zip(ex["input_ids"], ex["labels"], strict=True):
            if lab == -100:
                if cur:
                    runs.append(chat_tok.decode(cur))
                cur = []
            else:
                assert lab == tok
                cur.append(tok)
        return runs + ([chat_tok.decode(cur)] if cur else [])

    assert targets(every) == ["yes it is\n", "the plot is boring\n<|endoftext|>"]
    assert targets(last) == ["the plot is boring\n<|endoftext|>"]
    # rendered at tokenisation time (records with message lists) gives the same labels
    raw, _ = load_sft(path)
    assert tokenize_sft(raw, chat_tok)[0][0]["labels"] == every["labels"]
    # keep_end truncation cuts the prompt from the left: the first turn's targets go with it, the rest stay aligned
    (cut,), _ = tokenize_sft([rec], chat_tok, max_length=len(every["input_ids"]) - 3)
    assert targets(cut)[-1] == "the plot is boring\n<|endoftext|>" and cut["labels"] == every["labels"][3:]


def test_ultrafeedback_shape_string_prompt_beside_conversations(tmp_path, chat_tok):
    """UltraFeedback-binarized rows: a string `prompt` and `chosen`/`rejected` conversations that repeat it as their
    user turn (every row was rejected for mixing styles; TRL 1.16 crashes on them). They read as the TRL
    conversational row {prompt: [user], chosen: [assistant], rejected: [assistant]} does; answer-only
    conversations take the string prompt as the user turn; a string prompt that is not the conversation's last user
    message is a bad row naming the field."""
    uf = {"prompt": U["content"], "chosen": [U, A1], "rejected": [U, A2], "score_chosen": 8.0, "score_rejected": 3.0}
    answers_only = {"prompt": U["content"], "chosen": [A1], "rejected": [A2]}
    trl = {"prompt": [U], "chosen": [A1], "rejected": [A2]}
    path = _jsonl(tmp_path / "uf.jsonl", [uf, answers_only, trl])
    groups, stats = load_preferences(path, tokenizer=chat_tok)
    assert stats.bad_rows == 0 and len(groups) == 3
    for g in groups:
        assert g.prompt == "<|user|>is the movie good\n<|assistant|>"
        assert (g.pairs[0].chosen, g.pairs[0].rejected) == ("yes it is\n", "the plot is boring\n")
    raw, _ = load_preferences(_jsonl(tmp_path / "raw.jsonl", [uf]))
    assert raw[0].prompt == [U] and raw[0].pairs[0].chosen == [A1]
    bad = _jsonl(tmp_path / "bad.jsonl", [dict(uf, prompt="another question")])
    with pytest.raises(DataError, match=r"bad.jsonl line 1, field 'prompt': a string prompt beside conversations"):
        load_preferences(bad, tokenizer=chat_tok)
