"""Schemathesis fuzzes every operation of the OpenAPI spec (with valid tokens, so the
requests get past authentication): no 5xx, no traceback in any body, and error bodies in
the service's one-line JSON shape."""
# ruff: noqa: F811 - the shared fixtures are imported by name, then used as arguments

from __future__ import annotations

import pytest
from test_service_support import (  # noqa: F401 - fixtures
    MACHINES,
    fleet,
    open_api,
    service_clips,
    service_models,
)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, settings  # noqa: E402

MAX_EXAMPLES = 30  # per operation (14 of them): about 20-30 s in all


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, service_models, fleet, service_clips):
    tmp = tmp_path_factory.mktemp("fuzz")
    with open_api(tmp, service_models, fleet, keep_audio_days=1, rate_limit=10_000,
                  rate_burst=10_000, raise_server_exceptions=False) as api:
        for i in range(3):  # something to find: recordings 1-3, alert 1
            api.post_wav(MACHINES[0], service_clips.anomalous_bytes(i))
        yield api


def check_case(case, token: str) -> None:
    from schemathesis.checks import not_a_server_error

    response = case.call(headers={"Authorization": f"Bearer {token}"})
    case.validate_response(response, checks=[not_a_server_error])
    raw = response.content
    assert b"Traceback" not in raw and b'File "' not in raw, case.as_curl_command()
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "status"} and body["status"] == response.status_code
        assert "\n" not in body["error"]


def test_no_5xx_and_no_traceback_anywhere(fuzzed):
    # Hypothesis driven by hand over the operations (schemathesis' pytest plugin does not
    # load under this pytest); the endless event stream is left out: a fuzzer cannot wait
    # for its end (it is tested on a real server).
    from hypothesis import given

    token = fuzzed.tokens["admin"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed.app,
                                            headers={"Authorization": f"Bearer {token}"})
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/v1/events":
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            check_case(case, token)

        fuzz()
        tried.append(f"{operation.method.upper()} {operation.path}")
    assert len(tried) >= 14, tried
