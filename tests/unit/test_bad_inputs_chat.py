"""Bad `chat:` blocks and prompt files in an evaluate stage: exit 2, one message naming the place and the fix.

The same contract as ``test_bad_inputs.py`` (whose helpers run each case: in this process through typer's CliRunner,
or as ``python -m llmcompress.cli`` for ``proc`` cases), before any weights load and without touching other files.
"""

from __future__ import annotations

import pytest

from test_bad_inputs import Case, fifo, run_case, stage


def C(id, chat, *expect, files=None, setup=None, proc=False, args=("validate", "{file}")) -> Case:
    """An evaluate stage with only ``chat: <chat>`` to do."""
    text = stage("{type: evaluate, tasks: [], perplexity: null, chat: " + chat + "}")
    return Case(id, text, tuple(expect), tuple(args), files or {}, "recipe", {}, setup, proc)


ROW = '{"prompt": "What is the capital of France?", "answer": "Paris"}\n'

CASES = [
    # the block itself
    C("chat-unknown-key", "{promts: p.jsonl}", "{file}", "stages[0]", "unknown key `promts`",
      "Did you mean `prompts`?"),
    C("chat-not-a-mapping", "5", "{file}", "stages[0]", "chat"),
    C("chat-list", "[a]", "{file}", "stages[0]", "chat"),
    C("chat-max-new-tokens-0", "{max_new_tokens: 0}", "{file}", "chat.max_new_tokens"),
    C("chat-max-new-tokens-string", "{max_new_tokens: many}", "{file}", "chat.max_new_tokens"),
    C("chat-max-new-tokens-huge", "{max_new_tokens: 100000000}", "{file}", "chat.max_new_tokens"),
    C("chat-batch-size-0", "{batch_size: 0}", "{file}", "chat.batch_size"),
    C("chat-limit-0", "{limit: 0}", "{file}", "chat.limit"),
    C("chat-limit-float", "{limit: 1.5}", "{file}", "chat.limit"),
    C("chat-system-number", "{system: 5}", "{file}", "chat.system"),
    C("chat-builtin-typo", "{prompts: 'builtin:chatt'}", "{file}", "unknown prompt set `builtin:chatt`",
      "Did you mean `builtin:chat`?"),
    C("chat-prompts-txt", "{prompts: p.txt}", "{file}", "must be `builtin:chat` or a .jsonl file"),
    C("chat-prompts-list", "{prompts: [p.jsonl]}", "{file}", "chat.prompts"),
    # the prompt file
    C("chat-file-missing", "{prompts: gone.jsonl}", "{file}", "stages[0]", "gone.jsonl", "does not exist", "Fix:"),
    C("chat-file-folder", "{prompts: d.jsonl}", "{file}", "d.jsonl", "not a regular file",
      files={"d.jsonl/x": "x"}),
    C("chat-file-fifo", "{prompts: pipe.jsonl}", "{file}", "pipe.jsonl", "not a regular file",
      setup=fifo("pipe.jsonl")),
    C("chat-file-empty", "{prompts: p.jsonl}", "{file}", "p.jsonl", "has no rows", files={"p.jsonl": ""}),
    C("chat-file-blank-lines", "{prompts: p.jsonl}", "{file}", "has no rows", files={"p.jsonl": "\n  \n"}),
    C("chat-file-binary", "{prompts: p.jsonl}", "{file}", "p.jsonl", "not UTF-8",
      files={"p.jsonl": bytes(range(256)) * 4}),
    C("chat-row-not-json", "{prompts: p.jsonl}", "{file}", "p.jsonl:2", "not valid JSON",
      files={"p.jsonl": ROW + "{bad\n"}),
    C("chat-row-list", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "not an object", files={"p.jsonl": "[1, 2]\n"}),
    C("chat-row-no-prompt", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "no `prompt`",
      files={"p.jsonl": '{"answer": "Paris"}\n'}),
    C("chat-row-empty-prompt", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "`prompt` is an empty string",
      files={"p.jsonl": '{"prompt": ""}\n'}),
    C("chat-row-answer-number", "{prompts: p.jsonl}", "{file}", "p.jsonl:3", "`answer` is an integer",
      files={"p.jsonl": ROW + "\n" + '{"prompt": "What is 2 + 3?", "answer": 5}\n'}),
    C("chat-row-answer-empty", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "`answer` is an empty string",
      files={"p.jsonl": '{"prompt": "a", "answer": " "}\n'}),
    C("chat-row-kind-list", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "`kind`",
      files={"p.jsonl": '{"prompt": "a", "kind": ["x"]}\n'}),
    C("chat-row-typo", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "unknown key `anwser`", "Did you mean `answer`?",
      files={"p.jsonl": '{"prompt": "a", "anwser": "b"}\n'}),
    C("chat-row-duplicate", "{prompts: p.jsonl}", "{file}", "p.jsonl:2", "the same prompt as line 1",
      files={"p.jsonl": ROW + ROW}),
    C("chat-row-deep", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", files={"p.jsonl": "[" * 100_000 + "\n"}),
    C("chat-dev-zero", "{prompts: /dev/zero}", "{file}", "/dev/zero", proc=True),
    C("chat-run-bad-file", "{prompts: p.jsonl}", "{file}", "p.jsonl:1", "no `prompt`",
      files={"p.jsonl": '{"answer": "b"}\n'}, args=("run", "{file}", "-q")),
    Case("chat-nothing-to-do", stage("{type: evaluate, tasks: [], perplexity: null, chat: null}"),
         ("{file}", "nothing to evaluate", "`chat` is off")),
]


def test_the_chat_corpus_covers_the_block_and_the_file():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_chat_input_exits_2_with_a_message_that_names_the_place(case, tmp_path, monkeypatch):
    run_case(case, tmp_path, monkeypatch)
