"""The HTTP surface: OpenAI-style request bodies (validated, with clear 4xx errors), the
`model` naming rule ("<base>" or "<base>:<account>") and API keys mapped to the accounts they may
use. Kept apart from Ray so every rule is tested without a cluster."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tkllm_ray.data.schema import is_valid_account_id, validate_account_id
from tkllm_ray.errors import TkllmError

MAX_PROMPT_CHARS = 32_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int = Field(16, ge=0, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    style: str | None = Field(None, min_length=1, max_length=64, description="pin a style expert's domain "
                              "(default: the account's manifest, else the router picks)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of up to 200 characters")
        return stops


class CompletionBody(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1, max_length=64)

    def prompt(self) -> str:
        """The conversation as the base sees it: one 'role: text' line per message, then the
        assistant's turn to speak."""
        text = "\n".join(f"{m.role}: {m.content}" for m in self.messages) + "\nassistant:"
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages: the conversation exceeds {MAX_PROMPT_CHARS} characters")
        return text


class AdminBody(BaseModel):
    """POST /v1/admin/{prefetch,reload,unload}: the accounts to act on (prefetch and reload: default
    all; unload: required)."""
    model_config = ConfigDict(extra="forbid")

    accounts: list[str] | None = Field(None, max_length=100_000)

    @field_validator("accounts")
    @classmethod
    def _ids(cls, v):
        bad = [a for a in v or [] if not is_valid_account_id(a)]
        if bad:
            raise ValueError(f"invalid account id {bad[0]!r} (letters, digits, '_', '.', '-'; up to 64)")
        return v


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind}}


def parse_model(model: str, base_name: str) -> str | None:
    """'<base>' -> None (the base alone); '<base>:<account>' -> the account id."""
    base, sep, account = model.partition(":")
    if base != base_name:
        raise ApiError(404, f"model {model!r} is not served here: use {base_name!r} or "
                            f"'{base_name}:<account_id>'", "model_not_found")
    if not sep:
        return None
    try:
        return validate_account_id(account)
    except TkllmError as e:
        raise ApiError(400, str(e), "invalid_request_error") from None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """API keys, stored hashed: {"keys": [{"sha256": hex, "accounts": [...] or "*", "admin": bool,
    "name": str}]}. A key reaches the base and the accounts it lists; "*" (admin keys) any."""

    def __init__(self, entries: list[dict]):
        self.entries = []
        for e in entries:
            accounts = e.get("accounts", [])
            if accounts != "*" and not (isinstance(accounts, list) and all(is_valid_account_id(a) for a in accounts)):
                raise ValueError(f"key {e.get('name', '?')!r}: accounts must be '*' or a list of account ids")
            if not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
                raise ValueError(f"key {e.get('name', '?')!r}: sha256 must be a 64-character hex digest")
            self.entries.append({**e, "accounts": accounts})

    @classmethod
    def from_file(cls, path: str) -> "KeyRing":
        return cls(json.loads(Path(path).read_text())["keys"])

    def check(self, authorization: str | None, account: str | None) -> dict:
        """The key entry behind an `Authorization: Bearer <key>` header, if it may use `account`."""
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        digest = hash_key(authorization[len("Bearer "):].strip())
        entry = next((e for e in self.entries if hmac.compare_digest(e["sha256"], digest)), None)
        if entry is None:
            raise ApiError(401, "invalid API key", "authentication_error")
        if account is not None and entry["accounts"] != "*" and account not in entry["accounts"]:
            raise ApiError(403, f"this API key may not use account {account!r}", "permission_error")
        return entry

    def check_admin(self, authorization: str | None) -> dict:
        """The key entry, if it is an admin key (what the /v1/admin endpoints need)."""
        entry = self.check(authorization, None)
        if not entry.get("admin"):
            raise ApiError(403, "this API key is not an admin key (the /v1/admin endpoints need one)",
                           "permission_error")
        return entry
