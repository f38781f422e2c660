"""schemathesis against the server's own OpenAPI schema: generated requests, valid and invalid, never get a
5xx, and every answer (status, content type, body) conforms to the schema."""

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings
from schemathesis.checks import content_type_conformance
from schemathesis.checks import not_a_server_error
from schemathesis.checks import response_schema_conformance
from schemathesis.checks import status_code_conformance
from schemathesis.config import SchemathesisConfig


@pytest.fixture(scope="module")
def openapi(asif_server):
    config = SchemathesisConfig()
    config.projects.get_default().generation.update(modes=list(schemathesis.GenerationMode))
    return schemathesis.openapi.from_url(f"{asif_server.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("openapi")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_generated_requests_conform(case):
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )
