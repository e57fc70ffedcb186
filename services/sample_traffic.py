"""Deterministic, realistic sample traffic (demo data, not a service): what SDKs send to /report.

Builds the bodies an OpenPipe SDK sends to `POST /report` (OpenAI chat completions) and
`POST /report-anthropic` (Anthropic Messages). Used by the demo, the tests and the
benchmarks. Stdlib only and no network: every value is drawn from the `random.Random`
passed in, so a seed fixes the output.

Report `i` is requested `i` seconds (plus jitter) after `now_ms`, which defaults to
`DEFAULT_NOW_MS`; pass `now_ms` to place the traffic elsewhere in time.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

JsonDict = dict[str, Any]

OPENAI_ROUTE = "/report"
ANTHROPIC_ROUTE = "/report-anthropic"

DEFAULT_NOW_MS = 1_735_732_800_000  # 2025-01-01T12:00:00Z
REQUEST_SPACING_MS = 1_000
MIN_LATENCY_MS = 300
MAX_LATENCY_MS = 4_000
ERROR_RATE = 0.03
TAGS_RATE = 0.15
TRUNCATION_RATE = 0.08
STRING_CONTENT_RATE = 0.5  # Anthropic: user content as a plain string vs. content blocks

# Requested model -> model name the API echoes back, with its relative share of traffic.
OPENAI_MODELS: dict[str, str] = {
    "gpt-4o-2024-08-06": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "o3-mini": "o3-mini-2025-01-31",
}
OPENAI_MODEL_WEIGHTS = (0.3, 0.4, 0.2, 0.1)
REASONING_MODELS = frozenset({"o3-mini"})
REASONING_MAX_COMPLETION_TOKENS = 4_096
ANTHROPIC_MODELS = (
    "claude-3-5-sonnet-20241022",
    "claude-3-5-haiku-20241022",
    "claude-3-7-sonnet-20250219",
)
ANTHROPIC_MODEL_WEIGHTS = (0.5, 0.3, 0.2)
# Tokens of Anthropic's hidden tool-use system prompt, by tool_choice mode.
ANTHROPIC_TOOL_PROMPT_TOKENS = {"auto": 346, "required": 313, "forced": 313}
# Generation speed, used to make latency follow the output length.
MS_PER_OUTPUT_TOKEN: dict[str, int] = {
    "gpt-4o-2024-08-06": 14,
    "gpt-4o-mini": 9,
    "gpt-4.1-mini": 8,
    "o3-mini": 5,
    "claude-3-5-sonnet-20241022": 15,
    "claude-3-5-haiku-20241022": 10,
    "claude-3-7-sonnet-20250219": 15,
}

CUSTOMER_TIERS = ("free", "pro", "enterprise")
CUSTOMER_TIER_WEIGHTS = (0.5, 0.35, 0.15)
ENVS = ("prod", "staging")
ENV_WEIGHTS = (0.85, 0.15)
TEMPERATURES = (0, 0, 0.2, 0.7)
SDK_TAGS: tuple[dict[str, str], ...] = (
    {"$sdk": "python", "$sdk.version": "4.1.0"},
    {"$sdk": "typescript", "$sdk.version": "0.21.0"},
)

FIRST_NAMES = ("Maria", "Jonas", "Priya", "Tom", "Aiko", "Samuel", "Lena", "Omar")
PEOPLE = ("Anna Schmidt", "David Okafor", "Mei Chen", "Carlos Ruiz", "Sofia Rossi", "James Patel")
ORGANIZATIONS = ("Northwind Traders", "Globex GmbH", "Initech", "Umbrella Logistics", "Contoso Ltd")
COUNTRIES = ("DE", "FR", "US", "BR", "JP", "IN")
PLANS = ("free", "pro", "enterprise")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# --- use-case: support-ticket classification (JSON mode) ---------------------------------
TICKET_SYSTEM = (
    "You are the support triage assistant for Acme Cloud. Classify the customer ticket. "
    'Respond with a JSON object with keys "category" (billing, bug, feature_request, '
    'account or other), "priority" (low, medium or high) and "reason" (one sentence).'
)
TICKET_GREETINGS = ("Hi team,", "Hello,", "Hey support,", "Good morning,")
TICKET_SIGNOFFS = ("Thanks, {name}", "Regards, {name}", "Cheers, {name}", "- {name}")
# (ticket body template, category, priority, reason)
TICKETS: tuple[tuple[str, str, str, str], ...] = (
    (
        "I was charged twice for the Pro plan this month (invoices INV-{n} and INV-{m}). "
        "Please refund the duplicate.",
        "billing",
        "high",
        "Duplicate charge with a refund request.",
    ),
    (
        "The CSV export on the Reports page keeps spinning since yesterday's update. "
        "Tried Chrome and Firefox.",
        "bug",
        "high",
        "Report export is broken after an update.",
    ),
    (
        "Could dashboards be shared with a read-only public link? Our clients keep asking.",
        "feature_request",
        "low",
        "Asks for public read-only dashboard links.",
    ),
    (
        "I can't log in: my 2FA codes were on my old phone. Account email is {login}@example.com.",
        "account",
        "medium",
        "Locked out after losing the 2FA device.",
    ),
    (
        "Webhook deliveries to our endpoint fail with a 502 about {pct}% of the time since {month} {day}.",
        "bug",
        "medium",
        "Intermittent webhook delivery failures.",
    ),
    (
        "How do I change the billing address on our invoices? We moved offices.",
        "billing",
        "low",
        "Wants to update the invoice address.",
    ),
    (
        "We need SAML SSO with Okta before we can roll out to {seats} seats.",
        "feature_request",
        "medium",
        "SSO is a blocker for a larger rollout.",
    ),
    ("Is there a discount for non-profits?", "other", "low", "General pricing question."),
)

# --- use-case: text-to-SQL --------------------------------------------------------------
SQL_SYSTEM = (
    "You translate analytics questions into PostgreSQL.\nTables:\n"
    "orders(id, customer_id, total_cents, status, created_at)\n"
    "customers(id, name, country, plan, signed_up_at)\n"
    "events(id, customer_id, kind, occurred_at)\n"
    "Return only the SQL query, no explanation."
)
# (question template, SQL template)
SQL_QUESTIONS: tuple[tuple[str, str], ...] = (
    (
        "What was the paid revenue in the last {days} days?",
        "SELECT SUM(total_cents) / 100.0 AS revenue\nFROM orders\nWHERE status = 'paid'\n"
        "  AND created_at >= now() - interval '{days} days';",
    ),
    (
        "Top {limit} customers from {country} by number of orders",
        "SELECT c.id, c.name, COUNT(o.id) AS order_count\nFROM customers c\n"
        "JOIN orders o ON o.customer_id = c.id\nWHERE c.country = '{country}'\n"
        "GROUP BY c.id, c.name\nORDER BY order_count DESC\nLIMIT {limit};",
    ),
    (
        "How many customers signed up each week this quarter?",
        "SELECT date_trunc('week', signed_up_at) AS week, COUNT(*) AS signups\nFROM customers\n"
        "WHERE signed_up_at >= date_trunc('quarter', now())\nGROUP BY week\nORDER BY week;",
    ),
    (
        "Which {plan} customers had no events in the last {days} days?",
        "SELECT c.id, c.name\nFROM customers c\nWHERE c.plan = '{plan}'\n  AND NOT EXISTS (\n"
        "    SELECT 1 FROM events e\n    WHERE e.customer_id = c.id\n"
        "      AND e.occurred_at >= now() - interval '{days} days'\n  );",
    ),
    (
        "Average order value per country, highest first",
        "SELECT c.country, AVG(o.total_cents) / 100.0 AS avg_order_value\nFROM orders o\n"
        "JOIN customers c ON c.id = o.customer_id\nGROUP BY c.country\n"
        "ORDER BY avg_order_value DESC;",
    ),
)

# --- use-case: product-description writing ----------------------------------------------
PRODUCT_SYSTEM = (
    "You are a copywriter for an outdoor-gear shop. Write a product description of 2-3 "
    "sentences in a warm, concrete tone. Never invent specifications."
)
# (name, category, features, price, description)
PRODUCTS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "Ridgeline 2 Tent",
        "tents",
        "2-person; 1.9 kg; double-wall; two vestibules",
        "349.00",
        "The Ridgeline 2 is a double-wall tent for two that weighs just 1.9 kg, light enough for "
        "long approaches. Two vestibules keep boots and packs out of the way, so nobody climbs "
        "over anyone at midnight.",
    ),
    (
        "Summit Down Jacket",
        "insulation",
        "800-fill down; 340 g; packs into its pocket",
        "279.00",
        "Warm 800-fill down in a jacket that weighs only 340 g. When the sun comes out, "
        "it packs into its own pocket and disappears into the corner of your pack.",
    ),
    (
        "Trailblaze 30 Daypack",
        "packs",
        "30 L; ventilated back panel; hydration sleeve",
        "129.00",
        "Thirty litres is room for layers, lunch and a first-aid kit. The ventilated "
        "back panel keeps you cool on the climb, and the hydration sleeve keeps water in reach.",
    ),
    (
        "Granite Trekking Poles",
        "accessories",
        "carbon; 480 g/pair; cork grips; flick locks",
        "159.00",
        "Carbon shafts bring the pair down to 480 g, and cork grips stay comfortable "
        "when your hands sweat. Flick locks adjust the length in seconds, even with gloves on.",
    ),
    (
        "Basecamp Stove",
        "cooking",
        "boils 1 L in 3 min; piezo ignition; 83 g",
        "69.00",
        "At 83 g the Basecamp Stove boils a litre of water in about three minutes. Piezo "
        "ignition means no hunting for a lighter when you want coffee at dawn.",
    ),
)

# --- use-case: entity extraction with a function call ------------------------------------
EXTRACT_SYSTEM = (
    "Extract every person, organization and date mentioned in the email and record them "
    "with the record_entities tool. Dates must be ISO 8601."
)
EXTRACT_TOOL: JsonDict = {
    "type": "function",
    "function": {
        "name": "record_entities",
        "description": "Record the entities found in a document.",
        "parameters": {
            "type": "object",
            "properties": {
                "people": {"type": "array", "items": {"type": "string"}},
                "organizations": {"type": "array", "items": {"type": "string"}},
                "dates": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["people", "organizations", "dates"],
        },
    },
}
EXTRACT_EMAILS = (
    "Hi {p1},\n\nFollowing our call with {org} on {month} {day}, {p2} will send the revised "
    "MSA by end of week.\n\nBest,\n{p3}",
    "{p1} from {org} confirmed the onsite workshop for {month} {day}. {p2} and I will draft the agenda.",
    "Reminder: the {org} renewal is due on {month} {day}. {p1} owns the negotiation; please "
    "loop in {p2} for pricing.",
)
TOOL_CHOICE_MODES = ("forced", "auto", "required")
TOOL_PREAMBLE = "I'll record the people, organizations and dates from this email."

# --- use-case: meeting-notes summarisation -----------------------------------------------
SUMMARY_SYSTEM = (
    "Summarize the meeting notes for people who missed the meeting: at most 4 bullet "
    "points, each naming the owner of any follow-up."
)
# (note template, summary bullet template)
MEETING_NOTES: tuple[tuple[str, str], ...] = (
    (
        "{p1} said the Postgres 16 migration is done except the reporting replica, which "
        "needs another maintenance window.",
        "Postgres 16 migration done; reporting replica still pending ({p1}).",
    ),
    (
        "Churn in the pro tier went up from 2.1% to 2.8%; {p2} thinks the new onboarding "
        "email is part of it.",
        "Pro churn rose to 2.8%; {p2} to review the onboarding email.",
    ),
    (
        "Mobile release 5.2 slips one week because of the App Store review.",
        "Mobile 5.2 delayed by one week (App Store review).",
    ),
    (
        "{p1} and {p2} will interview three candidates for the SRE role on Thursday.",
        "SRE interviews on Thursday ({p1}, {p2}).",
    ),
    (
        "Support backlog is down to 140 tickets; the goal is under 100 by month end.",
        "Support backlog at 140, target below 100 by month end.",
    ),
    (
        "Finance asked every team for the Q3 budget by Friday; {p2} collects engineering's.",
        "Q3 budgets due Friday; {p2} collects engineering's numbers.",
    ),
)

# --- failures -----------------------------------------------------------------------------
OPENAI_RATE_LIMIT_MESSAGE = (
    "Rate limit reached for {model} in organization org-{org} on tokens per min (TPM): "
    "Limit 200000, Used {used}, Requested {requested}. Please try again in {wait}ms. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
OPENAI_SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"
ANTHROPIC_RATE_LIMIT_MESSAGE = (
    "Number of request tokens has exceeded your per-minute rate limit "
    "(https://docs.anthropic.com/en/api/rate-limits); see the response headers for current "
    "usage. Please reduce the prompt length or the maximum tokens requested, or try again later."
)
ANTHROPIC_OVERLOADED_MESSAGE = "Overloaded"

_ALNUM = string.ascii_letters + string.digits
_HEX = "0123456789abcdef"


@dataclass(frozen=True)
class Case:
    """One provider-neutral LLM call: the prompt and what the model answers."""

    prompt_id: str
    system: str
    user: str
    text: str | None = None  # the assistant's text answer
    tool_args: JsonDict | None = None  # arguments of the tool call the model makes
    tool_choice: str = "auto"  # "auto" | "required" | "forced"
    json_mode: bool = False
    max_tokens: int = 512
    truncatable: bool = False
    truncated: bool = False

    @property
    def uses_tool(self) -> bool:
        return self.tool_args is not None


# --- small helpers -------------------------------------------------------------------------
def count_tokens(text: str) -> int:
    """Rough tokenizer: about four characters per token."""
    return max(1, round(len(text) / 4))


def _random_id(rng: random.Random, length: int, alphabet: str = _ALNUM) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def _pick(rng: random.Random, options: tuple[Any, ...], weights: tuple[float, ...]) -> Any:
    return rng.choices(options, weights=weights)[0]


def _slots(rng: random.Random) -> dict[str, Any]:
    """Values for every `{placeholder}` used by the templates above."""
    p1, p2, p3 = rng.sample(PEOPLE, 3)
    name = rng.choice(FIRST_NAMES)
    return {
        "name": name,
        "login": f"{name.lower()}.{rng.randint(1, 99)}",
        "n": rng.randint(20_000, 29_999),
        "m": rng.randint(30_000, 39_999),
        "pct": rng.choice((5, 10, 15, 20)),
        "seats": rng.choice((50, 120, 400, 1_500)),
        "days": rng.choice((7, 14, 30, 90)),
        "limit": rng.choice((5, 10, 20)),
        "country": rng.choice(COUNTRIES),
        "plan": rng.choice(PLANS),
        "month": rng.choice(MONTHS),
        "day": rng.randint(1, 28),
        "p1": p1,
        "p2": p2,
        "p3": p3,
        "org": rng.choice(ORGANIZATIONS),
    }


def _iso_date(slots: dict[str, Any]) -> str:
    month_no = MONTHS.index(slots["month"]) + 1
    return f"2025-{month_no:02d}-{slots['day']:02d}"


# --- use-case builders ---------------------------------------------------------------------
def _ticket_case(rng: random.Random) -> Case:
    s = _slots(rng)
    body, category, priority, reason = rng.choice(TICKETS)
    greeting = rng.choice(TICKET_GREETINGS)
    signoff = rng.choice(TICKET_SIGNOFFS)
    user = f"{greeting}\n\n{body.format(**s)}\n\n{signoff.format(**s)}"
    answer = {"category": category, "priority": priority, "reason": reason}
    return Case(
        "support-triage-v3", TICKET_SYSTEM, user, text=json.dumps(answer), json_mode=True, max_tokens=200
    )


def _sql_case(rng: random.Random) -> Case:
    s = _slots(rng)
    question, sql = rng.choice(SQL_QUESTIONS)
    return Case("text-to-sql-v2", SQL_SYSTEM, question.format(**s), text=sql.format(**s), max_tokens=400)


def _product_case(rng: random.Random) -> Case:
    name, category, features, price, description = rng.choice(PRODUCTS)
    user = f"Product: {name}\nCategory: {category}\nFeatures: {features}\nPrice: ${price}"
    return Case("pdp-copy-v5", PRODUCT_SYSTEM, user, text=description, max_tokens=160, truncatable=True)


def _extract_case(rng: random.Random) -> Case:
    s = _slots(rng)
    template = rng.choice(EXTRACT_EMAILS)
    people = [s[key] for key in ("p1", "p2", "p3") if "{" + key + "}" in template]
    args = {"people": people, "organizations": [s["org"]], "dates": [_iso_date(s)]}
    return Case(
        "email-entities-v1",
        EXTRACT_SYSTEM,
        template.format(**s),
        tool_args=args,
        tool_choice=rng.choice(TOOL_CHOICE_MODES),
        max_tokens=300,
    )


def _summary_case(rng: random.Random) -> Case:
    s = _slots(rng)
    notes = rng.sample(MEETING_NOTES, rng.randint(2, 3))
    user = f"Meeting notes ({s['month']} {s['day']}):\n" + "\n".join(
        f"- {note.format(**s)}" for note, _ in notes
    )
    summary = "\n".join(f"- {bullet.format(**s)}" for _, bullet in notes)
    return Case("meeting-summary-v2", SUMMARY_SYSTEM, user, text=summary, max_tokens=250, truncatable=True)


USE_CASES: tuple[Callable[[random.Random], Case], ...] = (
    _ticket_case,
    _sql_case,
    _product_case,
    _extract_case,
    _summary_case,
)
USE_CASE_WEIGHTS = (0.3, 0.2, 0.15, 0.2, 0.15)


def _pick_case(rng: random.Random, can_truncate: bool = True) -> Case:
    case = _pick(rng, USE_CASES, USE_CASE_WEIGHTS)(rng)
    if can_truncate and case.truncatable and rng.random() < TRUNCATION_RATE:
        return _truncate(case, rng)
    return case


def _truncate(case: Case, rng: random.Random) -> Case:
    """The model hits a (too small) max_tokens: cut the answer at that many tokens."""
    assert case.text is not None
    limit = min(rng.choice((24, 32, 48)), count_tokens(case.text) - 1)
    cut = case.text[: limit * 4].rsplit(" ", 1)[0]
    return replace(case, text=cut, max_tokens=limit, truncated=True)


def _metadata(case: Case, rng: random.Random) -> dict[str, str]:
    return {
        "prompt_id": case.prompt_id,
        "customer_tier": _pick(rng, CUSTOMER_TIERS, CUSTOMER_TIER_WEIGHTS),
        "env": _pick(rng, ENVS, ENV_WEIGHTS),
    }


def _timestamps(
    i: int, rng: random.Random, now_ms: int | None, model: str, output_tokens: int
) -> tuple[int, int]:
    """(requestedAt, receivedAt): latency grows with the output length, 300-4000 ms."""
    base = DEFAULT_NOW_MS if now_ms is None else now_ms
    requested = base + i * REQUEST_SPACING_MS + rng.randrange(REQUEST_SPACING_MS)
    latency = rng.randint(250, 700) + output_tokens * MS_PER_OUTPUT_TOKEN[model]
    return requested, requested + min(max(latency, MIN_LATENCY_MS), MAX_LATENCY_MS)


def _output_tokens(case: Case) -> int:
    if case.truncated:
        return case.max_tokens
    if case.tool_args is not None:
        return count_tokens(json.dumps(case.tool_args)) + 12
    assert case.text is not None
    return count_tokens(case.text) + 1


# --- OpenAI --------------------------------------------------------------------------------
def _openai_tool_choice(mode: str) -> str | JsonDict:
    if mode == "forced":
        return {"type": "function", "function": {"name": EXTRACT_TOOL["function"]["name"]}}
    return mode


def _openai_request(case: Case, model: str, rng: random.Random) -> JsonDict:
    request: JsonDict = {
        "model": model,
        "messages": [
            {"role": "system", "content": case.system},
            {"role": "user", "content": case.user},
        ],
    }
    if model in REASONING_MODELS:
        request["max_completion_tokens"] = REASONING_MAX_COMPLETION_TOKENS
        request["reasoning_effort"] = rng.choice(("low", "medium"))
    else:
        request["temperature"] = rng.choice(TEMPERATURES)
        request["max_tokens"] = case.max_tokens
    if case.uses_tool:
        request["tools"] = [EXTRACT_TOOL]
        request["tool_choice"] = _openai_tool_choice(case.tool_choice)
    if case.json_mode:
        request["response_format"] = {"type": "json_object"}
    request["metadata"] = _metadata(case, rng)
    return request


def _openai_prompt_tokens(request: JsonDict) -> int:
    tokens = 3 + sum(count_tokens(m["content"]) + 4 for m in request["messages"])
    if "tools" in request:
        tokens += count_tokens(json.dumps(request["tools"]))
    return tokens


def _openai_message(case: Case, rng: random.Random) -> tuple[JsonDict, str]:
    """(assistant message, finish_reason)."""
    if case.tool_args is not None:
        call = {
            "id": "call_" + _random_id(rng, 24),
            "type": "function",
            "function": {
                "name": EXTRACT_TOOL["function"]["name"],
                "arguments": json.dumps(case.tool_args, separators=(",", ":")),
            },
        }
        return {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}, "tool_calls"
    finish_reason = "length" if case.truncated else "stop"
    return {"role": "assistant", "content": case.text, "refusal": None}, finish_reason


def _openai_usage(case: Case, prompt_tokens: int, reasoning_tokens: int) -> JsonDict:
    completion_tokens = _output_tokens(case) + reasoning_tokens
    usage: JsonDict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def _openai_response(
    case: Case,
    model: str,
    request: JsonDict,
    created_s: int,
    reasoning_tokens: int,
    rng: random.Random,
) -> JsonDict:
    message, finish_reason = _openai_message(case, rng)
    return {
        "id": "chatcmpl-" + _random_id(rng, 29),
        "object": "chat.completion",
        "created": created_s,
        "model": OPENAI_MODELS[model],
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": _openai_usage(case, _openai_prompt_tokens(request), reasoning_tokens),
        "service_tier": "default",
        "system_fingerprint": "fp_" + _random_id(rng, 10, _HEX),
    }


def _openai_error(model: str, rng: random.Random) -> tuple[int, JsonDict]:
    """(statusCode, OpenAI error body) for a rate limit or a server error."""
    if rng.random() < 0.7:
        message = OPENAI_RATE_LIMIT_MESSAGE.format(
            model=model,
            org=_random_id(rng, 24),
            used=rng.randint(195_000, 199_900),
            requested=rng.randint(800, 3_000),
            wait=rng.randint(120, 900),
        )
        error = {"message": message, "type": "tokens", "param": None, "code": "rate_limit_exceeded"}
        return 429, {"error": error}
    error = {"message": OPENAI_SERVER_ERROR_MESSAGE, "type": "server_error", "param": None, "code": None}
    return 500, {"error": error}


def openai_report(i: int, rng: random.Random, *, now_ms: int | None = None) -> JsonDict:
    """A `/report` body: one logged OpenAI chat completion (about 3% are failures)."""
    model = _pick(rng, tuple(OPENAI_MODELS), OPENAI_MODEL_WEIGHTS)
    case = _pick_case(rng, can_truncate=model not in REASONING_MODELS)
    request = _openai_request(case, model, rng)
    reasoning_tokens = 64 * rng.randint(1, 12) if model in REASONING_MODELS else 0
    failed = rng.random() < ERROR_RATE
    output_tokens = 0 if failed else _output_tokens(case) + reasoning_tokens
    requested_at, received_at = _timestamps(i, rng, now_ms, model, output_tokens)
    body: JsonDict = {"requestedAt": requested_at, "receivedAt": received_at, "reqPayload": request}
    if failed:
        status_code, error_body = _openai_error(model, rng)
        body |= {
            "respPayload": error_body,
            "statusCode": status_code,
            "errorMessage": error_body["error"]["message"],
        }
    else:
        response = _openai_response(case, model, request, requested_at // 1000, reasoning_tokens, rng)
        body |= {"respPayload": response, "statusCode": 200}
    if rng.random() < TAGS_RATE:
        body["tags"] = dict(rng.choice(SDK_TAGS))
    return body


# --- Anthropic -----------------------------------------------------------------------------
def _anthropic_tool() -> JsonDict:
    function = EXTRACT_TOOL["function"]
    return {
        "name": function["name"],
        "description": function["description"],
        "input_schema": function["parameters"],
    }


def _anthropic_tool_choice(mode: str) -> JsonDict:
    if mode == "forced":
        return {"type": "tool", "name": EXTRACT_TOOL["function"]["name"]}
    return {"type": "any" if mode == "required" else "auto"}


def _anthropic_request(case: Case, model: str, rng: random.Random) -> JsonDict:
    content: str | list[JsonDict] = case.user
    if rng.random() >= STRING_CONTENT_RATE:
        content = [{"type": "text", "text": case.user}]
    request: JsonDict = {
        "model": model,
        "max_tokens": case.max_tokens,
        "system": case.system,
        "messages": [{"role": "user", "content": content}],
        "temperature": rng.choice(TEMPERATURES),
    }
    if case.uses_tool:
        request["tools"] = [_anthropic_tool()]
        request["tool_choice"] = _anthropic_tool_choice(case.tool_choice)
    return request


def _anthropic_content(case: Case, rng: random.Random) -> tuple[list[JsonDict], str]:
    """(content blocks, stop_reason)."""
    if case.tool_args is None:
        stop_reason = "max_tokens" if case.truncated else "end_turn"
        return [{"type": "text", "text": case.text}], stop_reason
    blocks: list[JsonDict] = []
    if case.tool_choice == "auto":
        blocks.append({"type": "text", "text": TOOL_PREAMBLE})
    blocks.append(
        {
            "type": "tool_use",
            "id": "toolu_01" + _random_id(rng, 22),
            "name": EXTRACT_TOOL["function"]["name"],
            "input": case.tool_args,
        }
    )
    return blocks, "tool_use"


def _anthropic_usage(case: Case, request: JsonDict) -> JsonDict:
    input_tokens = count_tokens(case.system) + count_tokens(case.user) + 7
    output_tokens = _output_tokens(case)
    if case.uses_tool:
        input_tokens += count_tokens(json.dumps(request["tools"]))
        input_tokens += ANTHROPIC_TOOL_PROMPT_TOKENS[case.tool_choice]
        if case.tool_choice == "auto":
            output_tokens += count_tokens(TOOL_PREAMBLE)
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def _anthropic_response(case: Case, model: str, request: JsonDict, rng: random.Random) -> JsonDict:
    content, stop_reason = _anthropic_content(case, rng)
    return {
        "id": "msg_01" + _random_id(rng, 22),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(case, request),
    }


def _anthropic_error(rng: random.Random) -> tuple[int, JsonDict]:
    """(statusCode, Anthropic error body): rate limited or overloaded."""
    if rng.random() < 0.5:
        return 429, {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": ANTHROPIC_RATE_LIMIT_MESSAGE},
        }
    return 529, {
        "type": "error",
        "error": {"type": "overloaded_error", "message": ANTHROPIC_OVERLOADED_MESSAGE},
    }


def anthropic_report(i: int, rng: random.Random, *, now_ms: int | None = None) -> JsonDict:
    """A `/report-anthropic` body: one logged Anthropic Messages call plus `metadata`."""
    model = _pick(rng, ANTHROPIC_MODELS, ANTHROPIC_MODEL_WEIGHTS)
    case = _pick_case(rng)
    request = _anthropic_request(case, model, rng)
    metadata = _metadata(case, rng)
    failed = rng.random() < ERROR_RATE
    output_tokens = 0 if failed else _output_tokens(case)
    requested_at, received_at = _timestamps(i, rng, now_ms, model, output_tokens)
    body: JsonDict = {"requestedAt": requested_at, "receivedAt": received_at, "reqPayload": request}
    if failed:
        status_code, error_body = _anthropic_error(rng)
        body |= {
            "respPayload": error_body,
            "statusCode": status_code,
            "errorMessage": error_body["error"]["message"],
        }
    else:
        body |= {"respPayload": _anthropic_response(case, model, request, rng), "statusCode": 200}
    body["metadata"] = metadata
    return body


def sample_reports(
    n: int, seed: int = 7, anthropic_share: float = 0.1, *, now_ms: int | None = None
) -> list[tuple[str, JsonDict]]:
    """`n` (route, body) pairs, route `/report` or `/report-anthropic`; same seed, same list."""
    rng = random.Random(seed)
    reports: list[tuple[str, JsonDict]] = []
    for i in range(n):
        if rng.random() < anthropic_share:
            reports.append((ANTHROPIC_ROUTE, anthropic_report(i, rng, now_ms=now_ms)))
        else:
            reports.append((OPENAI_ROUTE, openai_report(i, rng, now_ms=now_ms)))
    return reports
