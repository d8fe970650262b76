"""rules.yaml: every bad file in tests/config/ is refused with exactly its errors; the example
file loads; routes match as documented; ${VAR} interpolation; the version hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.rules import Rules, compile_path, load_rules, parse_rules
from gateway.runtime import check_serving

HERE = Path(__file__).parent
CONFIG = HERE / "config"
EXAMPLE = HERE.parent / "rules.yaml"

# Variables the bad files and the interpolation tests rely on being unset.
UNSET = ("RULES_TEST_UNSET_URL", "RULES_TEST_HOST", "RULES_TEST_A", "RULES_TEST_B")

HTTP_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or *"
ALGORITHMS = (
    "'HS256', 'HS384', 'HS512', 'RS256', 'RS384', 'RS512', 'PS256', 'ES256', 'ES384' or 'EdDSA'"
)
NEEDS_KEY = "RS256 needs a public key: set one of public_key, public_key_file or jwks_url"

BAD_FILES: list[tuple[str, list[str]]] = [
    ("bad_cost.yaml", ["routes[3].cost: must be a positive integer"]),
    ("cost_string.yaml", ["routes[0].cost: must be an integer, got the string '5'"]),
    ("unknown_key.yaml", ["routes[0].costs: unknown key (did you mean 'cost'?)"]),
    ("unknown_section.yaml", ["route: unknown key (did you mean 'routes'?)"]),
    ("unknown_upstream.yaml", ["routes[1].upstream: unknown upstream 'search_backend'"]),
    (
        "two_unknown_upstreams.yaml",
        [
            "routes[0].upstream: unknown upstream 'a1'",
            "routes[2].upstream: unknown upstream 'search'",
        ],
    ),
    ("unknown_token_type.yaml", ["routes[0].token_type: unknown token type 'lead_generation'"]),
    ("bad_path_pattern.yaml", ["routes[0].path: must start with '/', got 'v1/chat'"]),
    (
        "bad_path_segment.yaml",
        ["routes[0].path: segment 'chat*' is not a literal, '*', '**' or '{name}'"],
    ),
    ("double_star_not_last.yaml", ["routes[0].path: '**' may only be the last segment"]),
    ("empty_path_segment.yaml", ["routes[0].path: has an empty segment ('//')"]),
    (
        "path_with_query.yaml",
        ["routes[0].path: must not contain '?' or '#': the query string is not part of the path"],
    ),
    ("bad_method.yaml", [f"routes[0].method: 'FETCH' is not an HTTP method ({HTTP_METHODS})"]),
    (
        "method_not_a_string.yaml",
        ["routes[0].method: must be an HTTP method or a list of them, got 5"],
    ),
    ("bad_audience.yaml", ["auth.audience: must be a string or a list of strings, got 42"]),
    ("bad_algorithm.yaml", [f"auth.algorithms[1]: must be one of {ALGORITHMS}, got 'none'"]),
    (
        "invalid_yaml.yaml",
        [
            "line 6, column 1: invalid YAML: expected ',' or '}', but got '<scalar>' "
            "(while parsing a flow mapping started at line 5, column 13)"
        ],
    ),
    ("empty.yaml", ["(document): the file is empty"]),
    (
        "not_a_mapping.yaml",
        [
            "(document): must be a mapping of sections (upstreams, token_types, plans, routes, "
            "...), got a list"
        ],
    ),
    ("missing_upstreams.yaml", ["upstreams: is required"]),
    ("asymmetric_without_key.yaml", [f"auth.algorithms: {NEEDS_KEY}"]),
    ("two_key_sources.yaml", ["auth: give only one of public_key_file and jwks_url"]),
    (
        "bad_upstream_url.yaml",
        ["upstreams.ai.url: must be an http:// or https:// URL, got '127.0.0.1:9100'"],
    ),
    (
        "upstream_url_with_query.yaml",
        [
            "upstreams.ai.url: must not have a query string or fragment, "
            "got 'http://127.0.0.1:9100/api?key=x'"
        ],
    ),
    ("infinite_timeout.yaml", ["upstreams.ai.timeout_seconds: must be a finite number"]),
    (
        "timeout_string.yaml",
        ["upstreams.ai.timeout_seconds: must be a number, got the string '30'"],
    ),
    ("unknown_plan_in_route.yaml", ["routes[0].plans[1]: unknown plan 'premium'"]),
    ("empty_route_plans.yaml", ["routes[0].plans: must not be empty"]),
    (
        "allowance_unknown_token_type.yaml",
        ["plans.pro.allowance.forcast: unknown token type 'forcast'"],
    ),
    ("allowance_negative.yaml", ["plans.pro.allowance.general: must not be negative"]),
    ("bad_period.yaml", ["plans.pro.period: must be one of 'month', 'week' or 'day', got 'year'"]),
    ("limits_unknown_plan.yaml", ["limits.plans.premium: unknown plan 'premium'"]),
    ("unknown_upgrade_plan.yaml", ["plans.starter.upgrade_to: unknown plan 'professional'"]),
    (
        "token_type_name.yaml",
        ["token_types.Lead-Generation: names must be lower_snake_case, e.g. lead_generation"],
    ),
    ("integer_key.yaml", ["plans.2024: key must be a string, got 2024"]),
    ("route_not_a_mapping.yaml", ["routes[1]: must be a mapping, got the string '/v1/search'"]),
    ("enforce_string.yaml", ["routes[0].enforce: must be true or false, got the string 'yes'"]),
    ("bad_version.yaml", ["version: must be 1, got 2"]),
    (
        "limit_seconds_string.yaml",
        ["limits.default.min_interval.seconds: must be a number, got the string '3'"],
    ),
    (
        "degradation_unknown_token_type.yaml",
        ["license.degradation_order[1].token_types[1]: unknown token type 'strategy'"],
    ),
    (
        "pack_unknown_token_type.yaml",
        [
            "billing.packs.small.token_type: unknown token type 'generl'",
            "billing.plan_prices.premium: unknown plan 'premium'",
        ],
    ),
    (
        "env_var_missing.yaml",
        ["upstreams.ai.url: environment variable RULES_TEST_UNSET_URL is not set"],
    ),
    (
        "bad_env_reference.yaml",
        ["upstreams.ai.url: malformed variable reference: write ${NAME} or ${NAME:-default}"],
    ),
    ("duplicate_key.yaml", ["routes[0].cost: key given twice (lines 14 and 15)"]),
    ("duplicate_route_name.yaml", ["routes[2].name: duplicate route name 'x'"]),
    (
        "many_errors.yaml",
        [
            f"auth.algorithms: {NEEDS_KEY}",
            "auth.leeway_seconds: must be an integer, got the string '30'",
            "upstreams.ai.url: must be an http:// or https:// URL, got 'ftp://127.0.0.1:9100'",
            "plans.pro.period: must be one of 'month', 'week' or 'day', got 'monthly'",
            "plans.pro.allowance.forecast: unknown token type 'forecast'",
            "routes[1].cost: must be an integer, got 2.5",
            "routes[1].token_type: unknown token type 'leads'",
            "routes[2].path: segment '{id' is not a literal, '*', '**' or '{name}'",
            "routes[2].plan: unknown key (did you mean 'plans'?)",
            "routes[2].upstream: unknown upstream 'goals_backend'",
            "routes[3].cost: must be an integer, got true",
            "routes[3].name: duplicate route name 'chat'",
        ],
    ),
]


# Files that load but that serve refuses when it builds its objects from them.
REFUSED_BY_SERVE: list[tuple[str, list[str]]] = [
    (
        "public_key_file_missing.yaml",
        [
            "auth.public_key_file: cannot read /nonexistent/gateway-key.pem: "
            "No such file or directory"
        ],
    ),
]


@pytest.fixture(autouse=True)
def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_rules(text.encode())
    return info.value.errors


# --- bad files --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), BAD_FILES, ids=[name for name, _ in BAD_FILES])
def test_bad_file_is_refused_with_exactly_its_errors(name: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_rules(CONFIG / name)
    assert info.value.errors == expected
    assert info.value.source == str(CONFIG / name)


@pytest.mark.parametrize(
    ("name", "expected"), REFUSED_BY_SERVE, ids=[name for name, _ in REFUSED_BY_SERVE]
)
async def test_file_serve_refuses_fails_the_check(name: str, expected: list[str]) -> None:
    rules = load_rules(CONFIG / name)
    with pytest.raises(ConfigError) as info:
        await check_serving(rules, {})
    assert info.value.errors == expected
    assert info.value.source == str(CONFIG / name)


def test_every_bad_file_is_tested() -> None:
    tested = [name for name, _ in BAD_FILES + REFUSED_BY_SERVE]
    assert sorted(p.name for p in CONFIG.iterdir()) == sorted(tested)


def test_config_error_prefixes_every_line_with_the_file() -> None:
    path = CONFIG / "two_unknown_upstreams.yaml"
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert str(info.value) == (
        f"{path}: routes[0].upstream: unknown upstream 'a1'\n"
        f"{path}: routes[2].upstream: unknown upstream 'search'"
    )


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_rules(tmp_path / "nope.yaml")
    assert info.value.errors == ["cannot read: No such file or directory"]


# --- strictness: YAML has types, so the wrong type is refused, never converted -------------

BASE = """
upstreams:
  ai: {url: "http://127.0.0.1:9100/"}
token_types:
  general: {}
plans:
  pro: {allowance: {general: 100}}
"""


def with_route(fields: str) -> str:
    return (
        BASE + "routes:\n  - {path: /v1/chat, upstream: ai, token_type: general, " + fields + "}\n"
    )


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        ('"5"', "must be an integer, got the string '5'"),
        ("5.5", "must be an integer, got 5.5"),
        ("5.0", "must be an integer, got 5.0"),
        ("true", "must be an integer, got true"),
        ("[5]", "must be an integer, got a list"),
        ("0", "must be a positive integer"),
        ("-1", "must be a positive integer"),
    ],
)
def test_cost_must_be_a_positive_integer(cost: str, expected: str) -> None:
    assert errors_of(with_route(f"cost: {cost}")) == [f"routes[0].cost: {expected}"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", "must be true or false, got 1"),
        ('"true"', "must be true or false, got the string 'true'"),
    ],
)
def test_booleans_are_not_numbers_or_strings(value: str, expected: str) -> None:
    text = with_route(f"cost: 1, forward_authorization: {value}")
    assert errors_of(text) == [f"routes[0].forward_authorization: {expected}"]


def test_strings_are_not_numbers() -> None:
    text = BASE.replace("general: {}", "general: {description: 5}")
    assert errors_of(text) == ["token_types.general.description: must be a string, got 5"]


def test_integers_are_numbers() -> None:
    text = BASE.replace(
        '"http://127.0.0.1:9100/"}', '"http://127.0.0.1:9100/", timeout_seconds: 2}'
    )
    upstream = parse_rules(text.encode()).document.upstreams["ai"]
    assert upstream.timeout_seconds == 2.0
    assert upstream.url == "http://127.0.0.1:9100"  # without the trailing slash


def test_audience_list_with_a_non_string() -> None:
    text = "auth: {audience: [gateway, 7]}\n" + BASE
    assert errors_of(text) == [
        "auth.audience: must be a string or a list of strings, got 7 in the list"
    ]


# --- the example ------------------------------------------------------------------------


def test_example_rules_load_with_the_seed_product() -> None:
    rules = load_rules(EXAMPLE)
    assert rules.source == str(EXAMPLE)
    assert [(r.name, r.token_type, r.cost) for r in rules.routes] == [
        ("leads", "lead_generation", 5),
        ("goals", "goal_generation", 3),
        ("strategy", "strategy_analysis", 2),
        ("forecast", "forecast", 4),
        ("chat_completions", "general", 20),  # priced by usage: its hold
        ("chat", "general", 1),
    ]
    usage = rules.routes[4].config.usage
    assert usage is not None
    assert (usage.format, usage.rates.input, usage.rates.output, usage.hold) == (
        "openai",
        100,
        200,
        20,
    )
    assert rules.plan_allowances() == {
        "starter": ("month", {}),
        "pro": (
            "month",
            {
                "lead_generation": 50,
                "goal_generation": 20,
                "strategy_analysis": 100,
                "forecast": 30,
                "general": 100,
            },
        ),
        "enterprise": (
            "month",
            {
                "lead_generation": 500,
                "goal_generation": 200,
                "strategy_analysis": 1000,
                "forecast": 200,
                "general": 1000,
            },
        ),
    }


def test_example_upstream_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_BACKEND_URL", raising=False)
    assert load_rules(EXAMPLE).document.upstreams["ai_backend"].url == "http://127.0.0.1:9100"
    monkeypatch.setenv("AI_BACKEND_URL", "https://ai.internal:8443/")
    assert load_rules(EXAMPLE).document.upstreams["ai_backend"].url == "https://ai.internal:8443"


# --- route matching ---------------------------------------------------------------------

ROUTES = (
    BASE
    + """
routes:
  - {name: leads, method: POST, path: /v1/leads/generate,
     upstream: ai, token_type: general, cost: 5}
  - {name: goals, method: POST, path: "/v1/goals/{id}/generate",
     upstream: ai, token_type: general, cost: 3}
  - {name: report, method: GET, path: "/v1/reports/*",
     upstream: ai, token_type: general, cost: 2}
  - {name: special, method: POST, path: /v1/chat/special,
     upstream: ai, token_type: general, cost: 4}
  - {name: chat, method: [POST, get], path: "/v1/chat/**",
     upstream: ai, token_type: general, cost: 1}
  - {name: any_method, method: "*", path: /v1/anything,
     upstream: ai, token_type: general, cost: 1}
  - {name: root, path: /,
     upstream: ai, token_type: general, cost: 1}
"""
)


@pytest.fixture(scope="module")
def rules() -> Rules:
    return parse_rules(ROUTES.encode())


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/leads/generate", "leads"),
        ("POST", "/v1/leads/generate/", "leads"),  # a trailing slash is optional
        ("GET", "/v1/leads/generate", None),
        ("POST", "/v1/leads/generate/more", None),
        ("POST", "/v1/leads/generate?x=1", None),  # callers pass the path without its query
        ("POST", "/v1/goals/42/generate", "goals"),
        ("POST", "/v1/goals/4/2/generate", None),  # {id} is one segment, not two
        ("POST", "/v1/goals//generate", None),  # ... and not an empty one
        ("GET", "/v1/reports/q3", "report"),
        ("GET", "/v1/reports/q3/", "report"),
        ("GET", "/v1/reports/q3/detail", None),  # * is one segment too
        ("GET", "/v1/reports", None),
        ("POST", "/v1/chat/special", "special"),  # first match wins over chat
        ("GET", "/v1/chat/special", "chat"),  # special is POST only
        ("POST", "/v1/chat", "chat"),  # ** matches nothing
        ("POST", "/v1/chat/", "chat"),
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/v1/chat/a/b", "chat"),
        ("GET", "/v1/chat/completions", "chat"),  # methods are case-insensitive in the file
        ("PUT", "/v1/chat/completions", None),
        ("HEAD", "/v1/chat/completions", None),  # HEAD is not GET
        ("POST", "/v1/chatter", None),  # ** starts at a segment boundary
        ("DELETE", "/v1/anything", "any_method"),
        ("PROPFIND", "/v1/anything", "any_method"),
        ("GET", "/", "root"),
        ("GET", "/v2", None),
    ],
)
def test_route_matching(rules: Rules, method: str, path: str, expected: str | None) -> None:
    route = rules.match(method, path)
    assert (route.name if route else None) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/../leads/generate",  # would reach leads at chat's price
        "/v1/chat/./completions",
        "/v1/chat/..",
        "/v1/goals/../generate",
    ],
)
def test_paths_with_dot_segments_match_no_route(rules: Rules, path: str) -> None:
    assert rules.match("POST", path) is None


def test_dots_inside_a_segment_are_ordinary(rules: Rules) -> None:
    route = rules.match("POST", "/v1/chat/v1.2..final")
    assert route is not None and route.name == "chat"


def test_route_carries_its_upstream_cost_and_token_type(rules: Rules) -> None:
    route = rules.match("POST", "/v1/goals/7/generate")
    assert route is not None
    assert (route.index, route.cost, route.token_type) == (1, 3, "general")
    assert route.upstream.url == "http://127.0.0.1:9100"
    assert route.methods == frozenset({"POST"})
    chat = rules.match("POST", "/v1/chat")
    assert chat is not None and chat.methods == frozenset({"POST", "GET"})
    assert rules.routes[5].methods is None  # '*': any method


def test_unnamed_route_is_named_by_method_and_path() -> None:
    rules = parse_rules(with_route("method: [POST, GET], cost: 1").encode())
    assert rules.routes[0].name == "POST,GET /v1/chat"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("v1/chat", "must start with '/', got 'v1/chat'"),
        ("//v1", "has an empty segment ('//')"),
        ("/v1/../admin", "segment '..' is not allowed"),
        ("/v1/{id}x", "segment '{id}x' is not a literal, '*', '**' or '{name}'"),
        ("/v1/**/x", "'**' may only be the last segment"),
        ("/v1#top", "must not contain '?' or '#': the query string is not part of the path"),
    ],
)
def test_compile_path_refuses(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_path(pattern)
    assert str(info.value) == reason


def test_double_star_alone_matches_everything() -> None:
    pattern = compile_path("/**")
    assert all(pattern.match(p) for p in ("/", "/a", "/a/b/c"))


# --- ${VAR} interpolation ----------------------------------------------------------------


def described(text: str) -> str:
    rules = parse_rules(BASE.replace("general: {}", f'general: {{description: "{text}"}}').encode())
    return rules.document.token_types["general"].description


def test_variable_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RULES_TEST_A", "alpha")
    monkeypatch.setenv("RULES_TEST_B", "beta")
    assert described("${RULES_TEST_A}-${RULES_TEST_B}!") == "alpha-beta!"


def test_default_applies_when_unset_or_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    assert described("${RULES_TEST_A:-http://h:1/x}") == "http://h:1/x"
    assert described("${RULES_TEST_A:-}") == ""
    monkeypatch.setenv("RULES_TEST_A", "")
    assert described("${RULES_TEST_A:-fallback}") == "fallback"  # as in the shell
    assert described("${RULES_TEST_A}") == ""  # set, if empty
    monkeypatch.setenv("RULES_TEST_A", "given")
    assert described("${RULES_TEST_A:-fallback}") == "given"


def test_values_from_the_environment_are_not_interpolated_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RULES_TEST_A", "${RULES_TEST_B}")
    assert described("${RULES_TEST_A}") == "${RULES_TEST_B}"


def test_text_without_references_is_left_alone() -> None:
    assert described("costs $5 {per} call") == "costs $5 {per} call"


def test_every_missing_variable_is_reported() -> None:
    text = BASE.replace(
        '"http://127.0.0.1:9100/"', '"http://${RULES_TEST_A}:${RULES_TEST_B}/"'
    ).replace("general: {}", 'general: {description: "${RULES_TEST_A}"}')
    assert errors_of(text) == [
        "upstreams.ai.url: environment variable RULES_TEST_A is not set",
        "upstreams.ai.url: environment variable RULES_TEST_B is not set",
        "token_types.general.description: environment variable RULES_TEST_A is not set",
    ]


def test_variable_set_makes_the_bad_file_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RULES_TEST_UNSET_URL", "http://10.0.0.1:9100")
    rules = load_rules(CONFIG / "env_var_missing.yaml")
    assert rules.document.upstreams["ai"].url == "http://10.0.0.1:9100"


# --- the version ------------------------------------------------------------------------


def test_version_changes_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    text = with_route("cost: 1")
    path.write_text(text)
    first = load_rules(path).version
    assert len(first) == 12 and int(first, 16) >= 0
    assert load_rules(path).version == first  # same bytes, same version
    path.write_text(text.replace("cost: 1", "cost: 2"))
    assert load_rules(path).version != first
    path.write_text(text + "# a comment\n")
    assert load_rules(path).version != first  # the bytes, not the meaning


PRICED = """
version: 1
upstreams: {ai: {url: "http://127.0.0.1:9"}}
token_types:
  leads: {backend_cost: 0.40}
  chat: {backend_cost: 0.01}
  draft: {}
plans:
  pro: {price: 49, allowance: {leads: 50, chat: 1000}}
  team: {price: 29, allowance: {leads: 50, chat: 1000}}
  cheap: {price: 10, allowance: {draft: 5}}
  free: {}
billing: {minimum_margin: 0.3}
"""


def test_pricing_check_reports_plans_below_the_minimum_margin() -> None:
    rules = parse_rules(PRICED.encode(), "priced.yaml")
    # pro: 50 * 0.40 + 1000 * 0.01 = 30.00 <= 49 * 0.7 = 34.30: fine.
    # team: 30.00 > 29 * 0.7 = 20.30: reported. cheap: draft has no backend_cost.
    assert rules.margin_problems() == [
        "plans.team: its full allowance costs 30.00 in backend fees, more than its price "
        "29.00 less the 30% minimum margin (20.30)",
        "plans.cheap: cannot check its margin: no backend_cost for draft",
    ]


def test_pricing_check_is_silent_without_prices() -> None:
    assert load_rules(EXAMPLE).margin_problems() == []
