"""Reading trajectories: OpenAI chat format and JSONL steps, and errors that say where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.audit import load_trajectory, parse_trajectory
from corral.errors import TrajectoryError
from corral.model import ActionKind

CHAT = [
    {"role": "system", "content": "You are a coding agent."},
    {"role": "user", "content": [{"type": "text", "text": "Fix the date parser."}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "bash", "arguments": json.dumps({"command": "cat a.py"})},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {
                    "name": "str_replace_editor",
                    "arguments": json.dumps({"path": "a.py", "old_str": "x", "new_str": "y"}),
                },
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c2", "content": "edited"},
    {"role": "tool", "tool_call_id": "c1", "content": "print('hi')"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "c3",
                "function": {"name": "run", "arguments": {"cmd": ["pytest", "-q", "tests dir"]}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c3", "content": "1 passed"},
    {"role": "assistant", "content": "Done."},
]


def test_chat_format_with_tool_calls() -> None:
    t = parse_trajectory(json.dumps({"messages": CHAT}), "chat.json")
    assert t.task == "Fix the date parser."
    assert [s.text for s in t.steps] == [
        "cat a.py",
        'str_replace_editor({"new_str": "y", "old_str": "x", "path": "a.py"})',
        "pytest -q 'tests dir'",
    ]
    assert [s.output for s in t.steps] == ["print('hi')", "edited", "1 passed"]
    assert t.steps[1].action.kind is ActionKind.TOOL
    assert [s.action.step for s in t.steps] == [1, 2, 3]
    assert all(s.action.task == "Fix the date parser." for s in t.steps)
    # A bare list of messages and JSONL of messages read the same.
    assert parse_trajectory(json.dumps(CHAT)).steps[2].text == "pytest -q 'tests dir'"
    jsonl = "\n".join(json.dumps(m) for m in CHAT)
    assert [s.text for s in parse_trajectory(jsonl).steps] == [s.text for s in t.steps]


def test_mini_swe_agent_style_fenced_commands() -> None:
    msgs = [
        {"role": "system", "content": "..."},
        {"role": "user", "content": "Make the test pass."},
        {"role": "assistant", "content": "THOUGHT: look first.\n\n```bash\nls -la src/\n```"},
        {"role": "user", "content": "<returncode>0</returncode><output>a.py</output>"},
        {
            "role": "assistant",
            "content": "Two blocks is ambiguous:\n```bash\nls\n```\n```bash\npwd\n```",
        },
    ]
    t = parse_trajectory(json.dumps(msgs))
    assert t.task == "Make the test pass."
    assert [s.text for s in t.steps] == ["ls -la src/"]
    assert t.steps[0].output is not None and "a.py" in t.steps[0].output


def test_jsonl_steps_with_a_sticky_task_and_explicit_step_numbers() -> None:
    text = "\n".join(
        [
            json.dumps({"task": "T1"}),
            json.dumps({"command": "ls", "step": 10}),
            "",
            json.dumps({"command": ["echo", "a b"], "output": "a b"}),
            json.dumps({"tool": "read_file", "args": {"path": "x"}}),
        ]
    )
    t = parse_trajectory(text, "s.jsonl")
    assert t.task == "T1"
    assert [s.text for s in t.steps] == ["ls", "echo 'a b'", 'read_file({"path": "x"})']
    assert [s.action.step for s in t.steps] == [10, 2, 3]
    assert t.steps[1].where == "s.jsonl:4"


@pytest.mark.parametrize(
    "text, where",
    [
        ('{"command": "ls"}\n{"command": 5}\n', r"t\.jsonl:2: command: expected a string"),
        ('{"command": "ls"}\nnot json\n', r"t\.jsonl:2: not JSON"),
        ('{"command": "ls"}\n[1, 2]\n', r"t\.jsonl:2: expected a JSON object"),
        ('{"task": 3, "command": "ls"}\n', r"t\.jsonl:1: task: expected a string"),
        ('{"comand": "ls"}\n', r"t\.jsonl:1: command: a step needs 'command'"),
        ('{"command": "ls", "step": "two"}\n', r"t\.jsonl:1: step: expected an integer"),
        ("   \n", r"t\.jsonl: empty file"),
        ('{"task": "only a task"}\n', r"t\.jsonl: no steps"),
        (
            json.dumps(
                [
                    {"role": "user", "content": "t"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "bash", "arguments": "{bad"}}],
                    },
                ]
            ),
            r"t\.jsonl: \[1\]: tool_calls\[0\]\.function\.arguments: arguments are not JSON",
        ),
        (json.dumps([{"content": "no role"}]), r"t\.jsonl: \[0\]: role: a message needs"),
    ],
)
def test_errors_name_the_file_line_and_key(text: str, where: str) -> None:
    with pytest.raises(TrajectoryError, match=where):
        parse_trajectory(text, "t.jsonl")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrajectoryError, match="no such file"):
        load_trajectory(tmp_path / "nope.jsonl")
