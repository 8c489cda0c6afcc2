import pytest

from tests.server_helpers import make_client


@pytest.fixture
def client():
    """A TestClient of the OpenAI app over the fake engine (``client.engine``)."""
    c, engine = make_client()
    with c:
        c.engine = engine
        yield c
