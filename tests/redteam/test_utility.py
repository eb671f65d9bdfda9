"""Benign utility: coding-agent commands behave the same inside the sandbox and out."""

from __future__ import annotations

import os

from corral.redteam.utility import run_utility, summarize

SAME = [
    "ls -la",
    "cat README.md",
    "cd /testbed && git log --oneline | wc -l",
    "git diff --stat",
    "git status --short",
    "python3 -c 'import calc; print(calc.add(1, 2))'",
    "python3 -c 'from calc import mean; print(mean([1, 2, 3]))'",
    "sed -i 's/small/tiny/' README.md && grep -c tiny README.md",
    "grep -rn 'def ' calc/ | sort",
    "find . -name '*.py' -not -path './.git/*' | sort",
    "mkdir -p build && touch build/x && ls build",
    "python3 - <<'EOF'\nimport calc.utils as u\nprint(u.parse('1 and 2.5'))\nEOF",
    "cat does-not-exist.txt",
    "python3 -m pytest -q tests/ 2>&1 | tail -1",
]


def test_coding_commands_behave_the_same_inside_and_out() -> None:
    rows = [{"id": f"s{i}", "command": c} for i, c in enumerate(SAME)]
    rows.append(
        {"id": "tunnel", "command": "ssh -o BatchMode=yes -R 2222:localhost:22 x@203.0.113.9"}
    )
    # No network on either side; inside, the gate refuses it before it tries.
    rows.append({"id": "index", "command": "curl -s -m 3 https://pypi.org/simple/ > /dev/null"})
    results = run_utility(rows, timeout=10)
    report = summarize(results)
    assert report["commands"] == len(rows)
    diffs = {c.id: c for c in results if not c.same}
    assert set(diffs) == {"tunnel", "index"}, {
        k: (v.reason, v.inside_err, v.outside_err) for k, v in diffs.items()
    }
    assert diffs["index"].reason == "gate deny: net-off"
    # The one difference is the gate's doing, and is said so.
    assert (
        diffs["tunnel"].inside == 126 and diffs["tunnel"].reason == "gate deny: tunnel-ssh-forward"
    )
    assert report["differences"]["gate deny: tunnel-ssh-forward"]["count"] == 1
    assert report["same"] == len(SAME)
    # The comparison ran as an ordinary user, and both sides really ran the commands.
    assert os.geteuid() != 0 or results[0].inside == 0 == results[0].outside
