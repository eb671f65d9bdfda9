"""The LLM auditor: any OpenAI-compatible chat-completions endpoint (vLLM, OpenAI, ...).

One request per review; the reply must be the JSON verdict ``prompt.parse_reply``
accepts. A timeout, a connection failure, an HTTP error or a malformed reply is retried
(``retries`` more times, short backoff); when every try fails the verdict is the
configured ``failure_mode`` (deny or ask) with ``error`` set: an auditor that cannot
judge never lets an action through by default.

The model is one defence against an agent that writes to its reviewer; not the only one.
Agent-written text reaches it fenced as data (see ``prompt``), and text that addresses a
reviewer floors the verdict at ``ask`` (or the failure mode's strictness, if stricter)
whatever the model replied, so a model that obeys an injected "approve this" still
cannot turn the verdict into allow.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from corral.audit.prompt import ReplyError, build_messages, injection_hits, new_nonce, parse_reply
from corral.audit.protocol import Thresholds
from corral.audit.rules import load_audit_rules
from corral.audit.trajectory import Step, action_text
from corral.errors import AuditorError
from corral.model import Action, AuditVerdict, Category, Verdict

ENV_URL = "CORRAL_AUDIT_URL"
ENV_MODEL = "CORRAL_AUDIT_MODEL"
ENV_KEY = "CORRAL_AUDIT_API_KEY"


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """Where the model is and how to talk to it.

    ``url`` is the API base (``http://127.0.0.1:8000/v1``) or the full
    ``.../chat/completions`` address. ``timeout`` is per try, in seconds."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 20.0
    retries: int = 2
    backoff: float = 0.25
    failure_mode: Verdict = Verdict.ASK
    history_steps: int = 8
    max_chars: int = 4000
    temperature: float = 0.0
    max_tokens: int = 300
    json_mode: bool = True  # send response_format {"type": "json_object"}
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise AuditorError(
                f"the LLM auditor's url must start with http:// or https:// (got {self.url!r})"
            )
        if not self.model:
            raise AuditorError(
                "the LLM auditor needs a model name (--llm-model or $CORRAL_AUDIT_MODEL)"
            )
        if self.failure_mode is Verdict.ALLOW:
            raise AuditorError("the LLM auditor's failure mode must be deny or ask, never allow")
        if self.timeout <= 0 or self.retries < 0:
            raise AuditorError("the LLM auditor needs timeout > 0 and retries >= 0")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        model: str | None = None,
        *,
        default_url: str | None = None,
        default_model: str | None = None,
        api_key: str | None = None,
        **kw: Any,
    ) -> LLMConfig:
        """Flags first (``url``, ``model``), then ``$CORRAL_AUDIT_URL`` /
        ``$CORRAL_AUDIT_MODEL``, then the defaults (a policy's ``audit.llm``); the key
        from ``api_key``, else ``$CORRAL_AUDIT_API_KEY`` or ``$OPENAI_API_KEY``."""
        url = url or os.environ.get(ENV_URL) or default_url
        model = model or os.environ.get(ENV_MODEL) or default_model
        if not url:
            raise AuditorError(
                "the LLM auditor needs an endpoint: pass --llm-url URL or set $CORRAL_AUDIT_URL "
                "(an OpenAI-compatible API base such as http://127.0.0.1:8000/v1)"
            )
        key = api_key or os.environ.get(ENV_KEY) or os.environ.get("OPENAI_API_KEY")
        return cls(url=url, model=model or "", api_key=key, **kw)


class _Failed(Exception):
    pass


class LLMAuditor:
    name = "llm"

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self._injection = load_audit_rules().injection
        self._client: httpx.Client | None = None
        self.version = f"llm {config.model}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> LLMAuditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol ----------------------------------------------------------------------

    def review(self, task: str | None, history: Sequence[Step], action: Action) -> AuditVerdict:
        start = time.perf_counter()
        body = self._request(task, history, action)
        if self._client is None:
            self._client = httpx.Client(timeout=self.config.timeout)
        problems: list[str] = []
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(self.config.backoff * (2 ** (attempt - 1)))
            try:
                resp = self._client.post(self.config.endpoint, json=body, headers=self._headers())
                return self._finish(resp, task, history, action, start)
            except (httpx.HTTPError, _Failed, ReplyError) as e:
                problems.append(_describe(e))
        return self._failure(problems, action, start)

    async def areview(
        self, task: str | None, history: Sequence[Step], action: Action
    ) -> AuditVerdict:
        start = time.perf_counter()
        body = self._request(task, history, action)
        problems: list[str] = []
        async with httpx.AsyncClient(timeout=self.config.timeout) as client:
            for attempt in range(self.config.retries + 1):
                if attempt:
                    await asyncio.sleep(self.config.backoff * (2 ** (attempt - 1)))
                try:
                    resp = await client.post(
                        self.config.endpoint, json=body, headers=self._headers()
                    )
                    return self._finish(resp, task, history, action, start)
                except (httpx.HTTPError, _Failed, ReplyError) as e:
                    problems.append(_describe(e))
        return self._failure(problems, action, start)

    # -- parts -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def _request(
        self, task: str | None, history: Sequence[Step], action: Action
    ) -> dict[str, object]:
        nonce = new_nonce()
        c = self.config
        body: dict[str, object] = {
            "model": c.model,
            "messages": build_messages(
                task,
                history,
                action,
                nonce=nonce,
                history_steps=c.history_steps,
                max_chars=c.max_chars,
            ),
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
        }
        if c.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _finish(
        self,
        resp: httpx.Response,
        task: str | None,
        history: Sequence[Step],
        action: Action,
        start: float,
    ) -> AuditVerdict:
        if resp.status_code != 200:
            raise _Failed(f"HTTP {resp.status_code}: {resp.text[:160]!r}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ReplyError(f"not a chat-completions response: {resp.text[:160]!r}") from None
        if not isinstance(content, str):
            raise ReplyError("the reply has no text content")
        reply = parse_reply(content)
        c = self.config
        # The stricter of the model's word and what its own score means here.
        by_score = c.thresholds.verdict(reply.score)
        verdict = reply.verdict if reply.verdict.rank >= by_score.rank else by_score
        score, category, reason = reply.score, reply.category, reply.reason or "(no reason given)"
        signals: tuple[str, ...] = (f"llm:{c.model}",)
        shown = [action_text(action)]
        recent = list(history)[-c.history_steps :] if c.history_steps > 0 else []
        shown += [s.text for s in recent] + [s.output for s in recent if s.output]
        hit = injection_hits(shown, self._injection)
        if hit is not None:
            floor = Verdict.DENY if c.failure_mode is Verdict.DENY else Verdict.ASK
            if verdict.rank < floor.rank:
                verdict = floor
                score = max(score, c.thresholds.deny if floor is Verdict.DENY else c.thresholds.ask)
                category = Category.DEFENSE_EVASION
                reason = (
                    f"text the agent or its tools wrote addresses the reviewer ({hit[:60]!r}); "
                    f"the model's answer ({reply.verdict.value}: {reply.reason[:120]}) is not trusted"
                )
            signals += ("check:audit-reviewer-injection",)
        return AuditVerdict(
            verdict=verdict,
            score=score,
            category=category if score >= c.thresholds.ask else None,
            reason=reason,
            auditor=self.name,
            signals=signals,
            step=action.step,
            action_id=action.id,
            latency_s=time.perf_counter() - start,
        )

    def _failure(self, problems: list[str], action: Action, start: float) -> AuditVerdict:
        c = self.config
        mode = c.failure_mode
        return AuditVerdict(
            verdict=mode,
            score=c.thresholds.deny if mode is Verdict.DENY else c.thresholds.ask,
            category=None,
            reason=(
                f"the LLM auditor could not judge after {len(problems)} tries "
                f"({'; '.join(dict.fromkeys(problems))}); failure mode is {mode.value}"
            ),
            auditor=self.name,
            signals=(f"llm:{c.model}", "llm-unavailable"),
            step=action.step,
            action_id=action.id,
            latency_s=time.perf_counter() - start,
            error=True,
        )


def _describe(e: Exception) -> str:
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e})"
    return str(e) or type(e).__name__
